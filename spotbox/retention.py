"""Retention: rows whose ts is older than the retention period are deleted on a schedule, in bounded batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from spotbox.errors import StorageError
from spotbox.storage import Storage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Purge:
    """What one retention pass did."""

    cutoff: datetime
    deleted: int
    statements: int


class Retention:
    """Deletes old rows once at start, then every `interval_s`; at most `batch` rows per statement."""

    def __init__(
        self,
        storage: Storage,
        days: int,
        *,
        interval_s: float,
        batch: int,
        keep_after_id: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.storage = storage
        # Rows after this id are kept whatever their age: an upstream broker has not acknowledged them yet.
        self.keep_after_id = keep_after_id
        self.days = days
        self.interval_s = interval_s
        self.batch = batch
        self.passes = 0
        self.last: Purge | None = None
        self._passed = asyncio.Condition()

    async def purge(self) -> Purge:
        """Delete every row older than the period, one bounded statement at a time."""
        cutoff = datetime.now(UTC) - timedelta(days=self.days)
        deleted = statements = 0
        while True:
            count = await self.storage.delete_before(cutoff, self.batch, keep_after_id=self.keep_after_id())
            deleted += count
            statements += 1
            if count < self.batch:
                return Purge(cutoff, deleted, statements)
            # Each statement is short; between two, ingest batches get the database.
            await asyncio.sleep(0)

    async def run(self) -> None:
        """The schedule: a pass, then a wait, until cancelled; a failed pass is logged and retried next time."""
        while True:
            try:
                self.last = await self.purge()
            except StorageError as exc:
                logger.warning("retention pass failed, next in %.0f s: %s", self.interval_s, exc)
            except Exception:
                logger.exception("retention pass failed, next in %.0f s", self.interval_s)
            else:
                if self.last.deleted:
                    logger.info(
                        "retention deleted %d statuses older than %s", self.last.deleted, self.last.cutoff.isoformat()
                    )
            async with self._passed:
                self.passes += 1
                self._passed.notify_all()
            await asyncio.sleep(self.interval_s)

    async def wait_passes(self, count: int) -> None:
        """Wait until at least `count` passes have ended, failed or not."""
        async with self._passed:
            await self._passed.wait_for(lambda: self.passes >= count)
