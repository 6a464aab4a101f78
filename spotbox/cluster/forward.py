"""Store and forward: every committed status reaches an upstream broker, driven by the database, whatever the uplink.

Edge brokers bridge from a queue of their own (Mosquitto in memory, NanoMQ in SQLite, EMQX on disk) and lose what
that queue loses. spotbox already holds every status in its database, so the forwarder reads the rows after a
cursor, publishes them at QoS 1, and moves the cursor only over rows the upstream broker acknowledged. The cursor
is saved in the database; a restart resends from it. Delivery is at least once, and each message carries its row
id (user property `row_id`) so the receiver can deduplicate.

- Rows go out in id order, which is commit order on one gateway, so each robot's statuses arrive in order.
- Up to `window` publishes are in flight at once (capped by the broker's Receive Maximum), so catching up runs at
  the uplink's speed, not one message per round trip; `rate` (statuses a second) keeps a catch-up after a long
  outage from starving live ingest of the database and the event loop.
- A lost connection (a cut, a refusal, a silent link noticed by keep alive) fails the publishes in flight; the
  forwarder waits for the client to reconnect and resends from the last acknowledged row.
- Rejections and alert changes are forwarded live when the uplink is up (they are not rows of `status`); while it
  is down they wait in a bounded queue, and what does not fit is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mqtt5

from spotbox.cluster.client import (
    BrokerURL,
    ConnectionLostError,
    LinkState,
    MqttClient,
    PublishRefusedError,
    raise_for_refusal,
)
from spotbox.errors import StorageError
from spotbox.status import StoredStatus, dumps
from spotbox.storage import Storage

logger = logging.getLogger(__name__)

# Rows read from the database at once while catching up.
_PAGE = 500
# With nothing to forward, how often the database is asked again (live rows go out within this).
_IDLE_POLL_S = 0.1
# How often the acknowledged cursor is saved and the lag measured: a crash resends at most this much.
_SAVE_EVERY_S = 0.5
# Rejections and alert changes held while the uplink is down.
_EVENTS_MAX = 1000


@dataclass(frozen=True)
class ForwardConfig:
    """What every forward target shares."""

    gateway_id: str
    prefix: str
    rate: float
    window: int = 100
    keep_alive: int = 30
    forward_rejections: bool = True
    forward_alerts: bool = True


class _RateLimit:
    """A token bucket: at most `rate` takes a second on average, bursts of a tenth of a second."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._capacity = max(1.0, rate / 10)
        self._tokens = self._capacity
        self._at = clock()

    async def take(self) -> None:
        while True:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)


class Forwarder:
    """Forwards the status table to one upstream broker, from a durable cursor."""

    def __init__(
        self, storage: Storage, url: BrokerURL, config: ForwardConfig, tls: ssl.SSLContext | None = None
    ) -> None:
        self.storage = storage
        self.url = url
        self.target = str(url)  # the cursor's key: the URL without its password
        self.config = config
        # Reconnect attempts at most 10 s apart: a gateway catches its uplink back within seconds of its return.
        self.client = MqttClient(
            url,
            f"spotbox-{config.gateway_id}-forward",
            keep_alive=config.keep_alive,
            backoff_max_s=10.0,
            ssl_context=tls if url.tls else None,
            name="forward",
        )
        self.cursor = 0  # every row up to here is acknowledged upstream
        self.saved_cursor = 0
        self.forwarded = 0
        self.lag_rows = 0
        self.lag_seconds = 0.0
        self.events_dropped = 0
        self.refused = 0
        self.last_refusal: str | None = None
        self._rate = _RateLimit(config.rate)
        self._events: deque[tuple[str, bytes]] = deque()
        self._events_ready = asyncio.Event()

    def status_topic(self, serial: str) -> str:
        """Where a robot's statuses go upstream."""
        return f"{self.config.prefix}robot/{serial}/status"

    def state(self) -> dict[str, Any]:
        """This target as `GET /forward` shows it."""
        return {
            "target": self.target,
            "state": self.client.state.value,
            "last_error": self.last_refusal if self.client.state is LinkState.UP else self.client.last_error,
            "cursor": self.cursor,
            "lag_rows": self.lag_rows,
            "lag_seconds": round(self.lag_seconds, 3),
            "forwarded": self.forwarded,
            "refused": self.refused,
            "events_dropped": self.events_dropped,
            "connects": self.client.connects,
        }

    def forward_event(self, kind: str, topic: str, payload: bytes) -> None:
        """Queue a rejection (`kind` "rejection") or an alert change ("alert") for upstream, if switched on."""
        if (kind == "rejection" and not self.config.forward_rejections) or (
            kind == "alert" and not self.config.forward_alerts
        ):
            return
        if len(self._events) >= _EVENTS_MAX:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append((f"{self.config.prefix}{topic}", payload))
        self._events_ready.set()

    async def run(self) -> None:
        """Connect and forward until cancelled; the cursor is saved on the way out."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.client.run(), name=f"forward-{self.target}-client")
                group.create_task(self._forward_rows(), name=f"forward-{self.target}-rows")
                group.create_task(self._forward_events(), name=f"forward-{self.target}-events")
                group.create_task(self._save_and_measure(), name=f"forward-{self.target}-cursor")
        finally:
            with contextlib.suppress(StorageError, asyncio.CancelledError):
                await asyncio.shield(self._save())

    async def _load_cursor(self) -> None:
        while True:
            try:
                self.cursor = self.saved_cursor = await self.storage.forward_cursor(self.target)
            except StorageError as exc:
                logger.warning("forward %s: cannot read its cursor yet: %s", self.target, exc)
                await asyncio.sleep(1)
            else:
                logger.info("forward %s: resuming after row %d", self.target, self.cursor)
                return

    async def _forward_rows(self) -> None:
        await self._load_cursor()
        while True:
            await self.client.wait_connected()
            try:
                await self._send_from(self.cursor)
            except ConnectionLostError as exc:
                logger.info("forward %s: link lost, resending from row %d: %s", self.target, self.cursor, exc)
            except StorageError as exc:
                logger.warning("forward %s: cannot read statuses: %s", self.target, exc)
                await asyncio.sleep(1)

    async def _send_from(self, after: int) -> None:
        """Publish rows after `after` until the connection is lost, pipelined up to the window.

        PUBLISHes are written without waiting (no task per message); the oldest PUBACK is awaited only when the
        window is full, and the cursor moves over each acknowledged row in order.
        """
        in_flight: deque[tuple[StoredStatus, asyncio.Future[mqtt5.PubAckPacket]]] = deque()
        window = max(1, min(self.config.window, self.client.receive_maximum))
        try:
            while True:
                rows = await self.storage.statuses_after(after, _PAGE)
                if not rows:
                    while in_flight:
                        await self._settle(in_flight.popleft())
                    await asyncio.sleep(_IDLE_POLL_S)
                    continue
                for row in rows:
                    while len(in_flight) >= window or (in_flight and in_flight[0][1].done()):
                        await self._settle(in_flight.popleft())
                    await self._rate.take()
                    in_flight.append((row, self._publish(row)))
                    after = row.id
        finally:
            for _, future in in_flight:
                future.cancel()

    def _publish(self, row: StoredStatus) -> asyncio.Future[mqtt5.PubAckPacket]:
        return self.client.publish_nowait(
            self.status_topic(row.record.serial_number),
            dumps(row.to_api(include_payload=True)),
            user_properties=[("row_id", str(row.id)), ("gateway", self.config.gateway_id)],
            content_type="application/json",
        )

    async def _settle(self, sent: tuple[StoredStatus, asyncio.Future[mqtt5.PubAckPacket]]) -> None:
        """Wait for the oldest publish's PUBACK and move the cursor over it (ConnectionLostError ends the round)."""
        row, future = sent
        ack = await future
        try:
            raise_for_refusal(self.status_topic(row.record.serial_number), ack)
        except PublishRefusedError as exc:
            # The broker took the message and said no (an ACL, a quota): resending cannot change that. Count it,
            # report it, and move on, or one refused topic would stop the whole uplink.
            self.refused += 1
            self.last_refusal = str(exc)
            logger.error("forward %s: row %d refused upstream: %s", self.target, row.id, exc)
        else:
            self.forwarded += 1
        self.cursor = row.id

    async def _forward_events(self) -> None:
        while True:
            await self._events_ready.wait()
            while self._events:
                topic, payload = self._events[0]
                try:
                    await self.client.publish(topic, payload, content_type="application/json")
                except ConnectionLostError:
                    await self.client.wait_connected()
                    continue
                except PublishRefusedError as exc:
                    self.refused += 1
                    self.last_refusal = str(exc)
                self._events.popleft()
            self._events_ready.clear()

    async def _save(self) -> None:
        if self.cursor != self.saved_cursor:
            cursor = self.cursor
            await self.storage.save_forward_cursor(self.target, cursor)
            self.saved_cursor = cursor

    async def _save_and_measure(self) -> None:
        while True:
            await asyncio.sleep(_SAVE_EVERY_S)
            try:
                await self._save()
                lag_rows = await self.storage.count_after(self.cursor)
                oldest = await self.storage.rows_after(None, self.cursor, 1) if lag_rows else []
                # Both at once: GET /forward read between the two queries showed the new rows with the old age.
                self.lag_rows = lag_rows
                self.lag_seconds = (datetime.now(UTC) - oldest[0].received_at).total_seconds() if oldest else 0.0
            except StorageError as exc:
                logger.warning("forward %s: cannot save its cursor: %s", self.target, exc)


def keep_after_id(forwarders: list[Forwarder]) -> int | None:
    """The lowest cursor of all targets: retention keeps every row after it (None: nothing to keep)."""
    return min((forwarder.saved_cursor for forwarder in forwarders), default=None)
