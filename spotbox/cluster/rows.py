"""Live feeds across instances: every row committed to a shared PostgreSQL database reaches this instance's hub.

Several spotbox instances (cluster mode, or embedded-broker gateways sharing one PostgreSQL) commit statuses to one
table. A feed served here must carry the rows every instance committed, in one order, so that `Last-Event-ID`
resumes on any instance without a gap or a repeat. PostgreSQL storage draws row ids under a transaction-level
advisory lock held until commit (`COMMIT_ORDER_LOCK` in storage/postgres.py), so ids are in commit order: a read of
"rows after N" never passes a row still in flight. The RowSource is then the one path from the table to the hub:

- It keeps `last_id`, the last row it handed to the hub, and reads `statuses_after(last_id)` page by page when
  woken, publishing in id order. The database is the data path; nothing travels in a notification.
- Wake-ups: this instance's own commits (the pipeline's `on_stored`), and `LISTEN spotbox_status`, on which every
  instance's insert transaction notifies with a small payload naming its writer. Notifications are lost while the
  listening connection is down, so each (re)connect is followed by a re-read from `last_id`.
- Operations changes (alerts, the registry, connection ends) wake other instances on `LISTEN spotbox_ops`; the
  RowSource passes those wake-ups on to `followers` (spotbox/cluster/ops.py), with those of foreign statuses.
- With no feed open there is nothing to send: `last_id` just follows the table's end (own commits, or a `max(id)`
  on a foreign notification), so the first feed opened later does not get a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg

from spotbox.errors import StorageError
from spotbox.sse import FeedHub
from spotbox.status import StoredStatus
from spotbox.storage.postgres import OPS_CHANNEL, STATUS_CHANNEL, PostgresStorage
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)

# Rows read at once when catching up.
_PAGE = 500
# Pause between two attempts to reach the database for listening.
_RETRY_S = 1.0


class RowSource:
    """Hands every committed row, whoever committed it, to the hub in id (commit) order, each once."""

    def __init__(self, hub: FeedHub, storage: PostgresStorage) -> None:
        self.hub = hub
        self.storage = storage
        self.last_id = 0
        self.listening = False
        self.foreign_wakeups = 0
        self._wake = asyncio.Event()
        # The greatest id this instance committed, and rejections waiting for the rows committed before them.
        self._own_max = 0
        self._started = False
        self._rejections: deque[tuple[int, Rejection, datetime]] = deque()
        # Told of each notification another instance sent: its kind ("status", or an operations change kind
        # of OPS_CHANNEL), and "reconnect" after each (re)connect, as notifications sent meanwhile are lost.
        self.followers: list[Callable[[str], None]] = []

    def committed(self, rows: Sequence[StoredStatus]) -> None:
        """The pipeline's `on_stored`: this instance committed `rows`; never blocks."""
        if not rows:
            return
        self._own_max = max(self._own_max, rows[-1].id)
        if self.hub.stream_count == 0:
            # Rows below an id of a committed row are committed too (commit order): nothing before is missed later.
            self.last_id = max(self.last_id, rows[-1].id)  # rows come in id order
        else:
            self._wake.set()

    def rejected(self, rejection: Rejection, received_at: datetime) -> None:
        """A refusal for the fleet feeds, sent after the rows this instance committed before it (as without us)."""
        if not self._rejections and self._own_max <= self.last_id:
            self.hub.publish_rejected(rejection, received_at)
        else:
            self._rejections.append((self._own_max, rejection, received_at))
            self._wake.set()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload != self.storage.writer_tag:
            self.foreign_wakeups += 1
            self._wake.set()
            self._tell("status")

    def _ops_notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        kind, _, writer = payload.partition(" ")
        if writer != self.storage.writer_tag:
            self._tell(kind)

    def _tell(self, kind: str) -> None:
        for follower in self.followers:
            follower(kind)

    async def start_at_the_end(self) -> None:
        """Start after the rows stored so far (once, before anything is committed or any feed opens)."""
        with contextlib.suppress(StorageError):
            self.last_id = max(self.last_id, await self.storage.max_id())
            self._started = True

    async def run(self) -> None:
        """Listen and publish until cancelled."""
        if not self._started and self._own_max == 0:
            # The table's end could not be read at start: read it now, before this instance commits anything.
            self.last_id = max(self.last_id, await self._start_id())
        async with asyncio.TaskGroup() as group:
            group.create_task(self._listen(), name="spotbox-rows-listen")
            group.create_task(self._publish(), name="spotbox-rows-publish")

    async def _start_id(self) -> int:
        while True:
            try:
                return await self.storage.max_id()
            except StorageError as exc:
                logger.warning("live feeds: cannot read the last row id yet: %s", exc)
                await asyncio.sleep(_RETRY_S)

    async def _listen(self) -> None:
        """Keep one connection LISTENing; after each (re)connect, re-read from the last row seen."""
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.storage.dsn, timeout=10)
                await conn.add_listener(STATUS_CHANNEL, self._notified)
                await conn.add_listener(OPS_CHANNEL, self._ops_notified)
                self.listening = True
                self._wake.set()  # notifications sent while away are lost: read what was committed meanwhile
                self._tell("reconnect")
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, ended=lost: ended.set())
                while not lost.is_set() and not conn.is_closed():
                    # A dead server is not always noticed without traffic: ask it something now and then.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5):
                            await lost.wait()
                    if not lost.is_set():
                        async with asyncio.timeout(5):
                            await conn.execute("SELECT 1")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                if self.listening:
                    logger.warning("live feeds: lost the database's notifications, reconnecting: %r", exc)
            except Exception:
                logger.exception("live feeds: listening failed; reconnecting")
            finally:
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(_RETRY_S)

    async def _publish(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._catch_up()
            except StorageError as exc:
                logger.warning("live feeds: cannot read new rows, retrying: %s", exc)
                await asyncio.sleep(_RETRY_S)
                self._wake.set()
            except Exception:
                # A bug or a driver in a bad state: say so, and carry on from the last row sent.
                logger.exception("live feeds: reading new rows failed; retrying")
                await asyncio.sleep(_RETRY_S)
                self._wake.set()

    async def _catch_up(self) -> None:
        if self.hub.stream_count == 0:
            end = await self.storage.max_id()
            # A feed opened while asking must get the rows committed since it subscribed: skip nothing then.
            if self.hub.stream_count == 0:
                self.last_id = max(self.last_id, end)
                self._rejections.clear()  # nobody to tell
                return
        while True:
            rows = await self.storage.statuses_after(self.last_id, _PAGE)
            # Own commits may have moved last_id on while reading (with no feed open): publish each row once.
            fresh = [row for row in rows if row.id > self.last_id]
            if fresh:
                self.hub.publish(fresh)
                self.last_id = fresh[-1].id
            while self._rejections and self._rejections[0][0] <= self.last_id:
                _, rejection, received_at = self._rejections.popleft()
                self.hub.publish_rejected(rejection, received_at)
            if len(rows) < _PAGE:
                return
