"""The storage protocol every backend implements, and what the two backends share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from spotbox.status import StatusRecord, StoredStatus

# Columns written for each status, in this order, by every backend.
COLUMNS = (
    "serial_number",
    "ts",
    "received_at",
    "battery_level",
    "battery_status",
    "driving_status",
    "current_drive_id",
    "latitude",
    "longitude",
    "height",
    "payload",
    "payload_hash",
)


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """One page of one robot's history, ordered by (ts, id)."""

    serial_number: str
    start: datetime | None = None
    end: datetime | None = None
    after: tuple[datetime, int] | None = None
    limit: int = 500


class Storage(Protocol):
    """Where validated statuses are kept. One writer calls `write_batch`; readers may run concurrently."""

    async def open(self) -> None:
        """Connect, then create or migrate the schema."""

    async def write_batch(self, records: Sequence[StatusRecord]) -> list[int | None]:
        """Commit `records` in one transaction; the row id of each, or None for a duplicate already stored."""

    async def history(self, query: HistoryQuery) -> list[StoredStatus]:
        """Up to `query.limit` rows of one robot, oldest first."""

    async def robot_exists(self, serial_number: str) -> bool:
        """True once any status of this robot is stored."""

    async def rows_after(self, serial_number: str | None, after_id: int, limit: int) -> list[StoredStatus]:
        """Up to `limit` rows with id greater than `after_id`, by id: of one robot, or of the fleet for None."""

    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the database answers."""

    async def close(self) -> None:
        """Release connections; safe to call twice."""


def assign_ids(records: Sequence[StatusRecord], returned: dict[tuple[str, int, bytes], int]) -> list[int | None]:
    """Map the rows an INSERT ... ON CONFLICT DO NOTHING RETURNING gave back onto the batch, in batch order.

    RETURNING order is unspecified, so rows are matched by their dedup key; a record whose key was not returned
    (already stored), or that repeats an earlier record of the same batch, is a duplicate: None.
    """
    return [returned.pop(record.dedup_key, None) for record in records]
