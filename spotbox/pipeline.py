"""The ingest pipeline: a bounded queue that one writer drains in batches, then fans committed rows out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import Histogram

from spotbox.errors import StorageError, StorageUnavailableError
from spotbox.stats import StatsWindow
from spotbox.status import Delivery, StatusRecord, StoredStatus, is_valid_serial
from spotbox.storage import Storage
from spotbox.validation import Rejection, StatusValidator

logger = logging.getLogger(__name__)

# A status this large or larger is validated off the event loop (IngestPipeline.check_large). A status of a robot
# is a few hundred bytes; parsing and checking 64 KiB takes about a millisecond, which the loop may as well spend.
OFF_LOOP_MIN = 64 * 1024
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 5.0
# A SQLite batch commits in about a millisecond, a PostgreSQL one in a few; seconds mean trouble.
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_Item = tuple[StatusRecord, "asyncio.Future[int | None]"]


@dataclass
class IngestStats:
    """Counters since start, for logs, readiness and the bench."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class IngestPipeline:
    """Validates statuses, commits them in batches through one writer, and hands stored rows to `on_stored`.

    `on_rejected` hears of each refused status (with its raw payload) as it is refused; both callbacks must return
    at once.
    """

    def __init__(
        self,
        storage: Storage,
        validator: StatusValidator,
        on_stored: Callable[[Sequence[StoredStatus]], None],
        *,
        on_rejected: Callable[[Rejection, datetime, bytes], None] | None = None,
        queue_size: int,
        batch_max: int,
        batch_wait_s: float,
    ) -> None:
        self.storage = storage
        self.validator = validator
        self.stats = IngestStats()
        # The last hour, per robot, for /stats; `stats` keeps the totals since start.
        self.window = StatsWindow()
        self.storage_available = True
        self._on_stored = on_stored
        self._on_rejected = on_rejected
        # Not registered anywhere: each app's /metrics collects it from its own pipeline.
        self.commit_seconds = Histogram(
            "spotbox_batch_commit_seconds",
            "Time to commit one batch of statuses to storage.",
            buckets=COMMIT_BUCKETS_S,
            registry=None,
        )
        # A deque with two events rather than an asyncio.Queue: the writer takes all that is queued at once, where a
        # Queue costs a get (and a put) of a few calls per status. None is the stop sentinel: the writer commits
        # everything queued before it, then returns.
        self._queue: deque[_Item | None] = deque()
        self._queue_size = queue_size
        self._first_queued_at = 0.0  # when the queue last went from empty to not empty (time.monotonic)
        # Set when the queue goes from empty to not empty; the writer clears it before it waits for a first status.
        self._arrived = asyncio.Event()
        # Set when the queue holds a full batch (or the stop sentinel): ends the writer's wait for a batch to fill.
        self._filled = asyncio.Event()
        # Set whenever the writer has taken from the queue; readers of publishing sockets wait on it when full.
        self._room = asyncio.Event()
        self._room.set()
        self._stopping = False
        # Where statuses of OFF_LOOP_MIN bytes or more are validated (see check_large). Its thread starts with the
        # first such status, and ends with this pipeline (an HTTP status may still come while the app stops).
        self._validating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotbox-validate")
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_s

    def check(
        self, serial: str, raw: bytes, received_at: datetime | None = None, *, delivery: Delivery | None = None
    ) -> StatusRecord | Rejection:
        """Validate one payload received now (or at `received_at`), counting and logging a rejection as one line.

        `delivery` identifies an MQTT QoS 1/2 delivery; for a status without a timestamp it is kept with the row,
        so that a resend (DUP) of it is stored once even after a restart.
        """
        received_at = received_at or datetime.now(UTC)
        return self._counted(serial, raw, received_at, delivery, self.validator.check(serial, raw, received_at))

    async def check_large(
        self, serial: str, raw: bytes, received_at: datetime | None = None, *, delivery: Delivery | None = None
    ) -> StatusRecord | Rejection:
        """`check`, with a payload of OFF_LOOP_MIN bytes or more validated on the validation thread, so that the
        event loop serves every other client meanwhile (the MQTT path calls `check` itself for a small one).

        Parsing and walking 1 MiB of JSON held the loop up to about a second (17,000 arrays nested 30 deep):
        every other client's packets, keep-alives and acknowledgements waited that long. The thread still takes
        the same CPU, but the interpreter hands the loop its turn every few milliseconds. One thread: a flood of
        such statuses is validated one after another, not with the loop competing against several.
        """
        if len(raw) < OFF_LOOP_MIN:
            return self.check(serial, raw, received_at, delivery=delivery)
        received_at = received_at or datetime.now(UTC)
        verdict = await asyncio.get_running_loop().run_in_executor(
            self._validating, self.validator.check, serial, raw, received_at
        )
        return self._counted(serial, raw, received_at, delivery, verdict)

    def _counted(
        self,
        serial: str,
        raw: bytes,
        received_at: datetime,
        delivery: Delivery | None,
        verdict: StatusRecord | Rejection,
    ) -> StatusRecord | Rejection:
        self.stats.received += 1
        if type(verdict) is StatusRecord:
            if delivery is not None and verdict.ts == verdict.received_at:
                verdict.delivery_key = delivery.key(verdict.payload_hash)
                verdict.resend = delivery.resend
            self.window.count(serial, None)  # a valid status has a valid serial
            return verdict
        rejected = verdict.field if isinstance(verdict, Rejection) else None
        self.window.count(serial if is_valid_serial(serial) else None, rejected)
        if isinstance(verdict, Rejection):
            self.stats.rejected[verdict.field] += 1
            logger.warning(
                "rejected status serial=%s field=%s reason=%s",
                verdict.serial_number,
                verdict.field,
                verdict.reason,
                extra={
                    "event": "status_rejected",
                    "serial": verdict.serial_number,
                    "field": verdict.field,
                    "reason": verdict.reason,
                    "errors": verdict.errors,
                },
            )
            if self._on_rejected is not None:
                self._on_rejected(verdict, received_at, raw)
        return verdict

    async def commit(self, record: StatusRecord) -> int | None:
        """Queue a valid record and wait until it is committed (waits while the queue is full).

        Returns its row id, or None when the same status was already stored.
        """
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        await self._put((record, future))
        return await future

    def submit(self, record: StatusRecord) -> asyncio.Future[int | None]:
        """Queue a valid record without waiting (the caller waited for room); its future resolves once committed."""
        if len(self._queue) >= self._queue_size:
            raise asyncio.QueueFull
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._append((record, future))
        return future

    async def _put(self, item: _Item | None) -> None:
        await self.wait_for_room()
        self._append(item)

    def _append(self, item: _Item | None) -> None:
        queue = self._queue
        if not queue:
            self._first_queued_at = time.monotonic()
            self._arrived.set()
        queue.append(item)
        if item is None or len(queue) >= self._batch_max:
            self._filled.set()

    @property
    def full(self) -> bool:
        """True while the queue holds `queue_size` statuses: readers of publishing sockets should wait."""
        return len(self._queue) >= self._queue_size

    async def wait_for_room(self) -> None:
        """Return once the queue has room (the writer sets `_room` each time it takes from it)."""
        while len(self._queue) >= self._queue_size:
            self._room.clear()
            await self._room.wait()

    @property
    def depth(self) -> int:
        """Records waiting for the writer."""
        return len(self._queue)

    async def run(self) -> None:
        """The writer loop: take a batch, commit it (retrying while storage is away), fan it out; until stopped."""
        while not self._stopping:
            batch = await self._next_batch()
            try:
                await self._write(batch)
            except Exception as exc:
                # A bug, not an outage: fail this batch (nothing is acknowledged) and keep serving.
                logger.exception("writer failed on a batch of %d statuses", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StorageError(f"not stored: {exc!r}"))

    async def stop(self) -> None:
        """Ask the writer to commit everything queued so far and return; call once nothing submits any more."""
        await self._put(None)

    async def _next_batch(self) -> list[_Item]:
        """Wait for a first status, then until `batch_wait_s` after it was queued (or until `batch_max` are queued);
        take up to `batch_max`.

        Statuses that queued up while the last batch was being committed have waited that long already: they are
        committed at once. Waiting on until some time after the previous commit would hold a publisher's whole
        window of statuses, which then waits for its acknowledgements to send more, for nothing.

        The writer wakes once a batch, not once a status: at 10,000 robots each status arrives alone, and a wake-up
        with a new timeout for each (as before) cost the event loop a task step, a future and a timer a status.
        """
        queue = self._queue
        while not queue:
            self._arrived.clear()
            await self._arrived.wait()
        remaining = self._first_queued_at + self._batch_wait_s - time.monotonic()
        if remaining > 0 and len(queue) < self._batch_max and queue[-1] is not None:
            self._filled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._filled.wait()
        batch: list[_Item] = []
        for _ in range(min(len(queue), self._batch_max)):
            item = queue.popleft()
            if item is None:
                self._stopping = True
                break
            batch.append(item)
        self._room.set()
        return batch

    async def _write(self, batch: list[_Item]) -> None:
        if not batch:
            return
        ids = await self._write_isolating([record for record, _ in batch])
        stored: list[StoredStatus] = []
        for (record, future), row_id in zip(batch, ids, strict=True):
            if isinstance(row_id, StorageError):
                # Refused by the database itself: not acknowledged, not a duplicate.
                if not future.done():
                    future.set_exception(row_id)
                continue
            if row_id is None:
                self.stats.duplicates += 1
            else:
                self.stats.stored += 1
                stored.append(StoredStatus(row_id, record))
            if not future.done():
                future.set_result(row_id)
        if stored:
            self._on_stored(stored)

    async def _write_isolating(self, records: list[StatusRecord]) -> list[int | StorageError | None]:
        """Write a batch; when the database refuses it for a row in it, split it in halves until that row is alone.

        Validation refuses whatever a database is known to refuse, so this is for the unforeseen: one such row
        costs about 2 * log2(batch size) transactions (18 for 500), not one per row, and the other rows of the
        batch are committed as usual.
        """
        try:
            return list(await self._write_retrying(records))
        except StorageError as exc:
            if len(records) == 1:
                logger.error("status of %s refused by the database, not stored: %s", records[0].serial_number, exc)
                return [exc]
            logger.error("batch of %d refused (%s); splitting it to isolate the refused rows", len(records), exc)
        half = len(records) // 2
        return [*await self._write_isolating(records[:half]), *await self._write_isolating(records[half:])]

    async def _write_retrying(self, records: list[StatusRecord]) -> list[int | None]:
        """Write, retrying with capped exponential backoff while storage is unreachable."""
        delay = _BACKOFF_FIRST_S
        while True:
            started = time.perf_counter()
            try:
                ids = await self.storage.write_batch(records)
            except StorageUnavailableError as exc:
                if self.storage_available:
                    logger.warning("storage unavailable, holding %d statuses and retrying: %s", len(records), exc)
                self.storage_available = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            self.commit_seconds.observe(time.perf_counter() - started)
            if not self.storage_available:
                logger.info("storage is back; writing resumed")
                self.storage_available = True
            return ids
