"""The alert webhook (`--alert-webhook URL`): each alert change POSTed as JSON, retried with backoff, in the
background: a slow or dead receiver never holds up ingest; past `max_pending` queued changes the oldest go."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import aiohttp

from spotbox.status import dumps_kept

logger = logging.getLogger(__name__)


class Webhook:
    """POSTs queued JSON documents to one URL, in order, each retried until it is accepted (2xx) or given up."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 6,
        first_delay_s: float = 0.5,
        max_delay_s: float = 30.0,
        timeout_s: float = 10.0,
        max_pending: int = 10_000,
    ) -> None:
        self.url = url
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.failed = 0
        self._pending: deque[bytes] = deque(maxlen=max_pending)
        self._wake = asyncio.Event()

    def send(self, document: Any) -> None:
        """Queue `document` for the receiver; returns at once."""
        if len(self._pending) == self._pending.maxlen:
            self.failed += 1
            logger.error("alert webhook is %d changes behind; the oldest is dropped", self._pending.maxlen)
        self._pending.append(dumps_kept(document))
        self._wake.set()

    async def run(self) -> None:
        """Deliver queued documents until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    body = self._pending.popleft()
                    await self._deliver(session, body)

    async def _deliver(self, session: aiohttp.ClientSession, body: bytes) -> None:
        delay = self.first_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    if 200 <= resp.status < 300:
                        self.sent += 1
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = repr(exc)
            if attempt < self.attempts:
                logger.warning("alert webhook %s: %s; retry %d in %.1f s", self.url, problem, attempt, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
        self.failed += 1
        logger.error("alert webhook %s: gave up on one alert change after %d attempts", self.url, self.attempts)
