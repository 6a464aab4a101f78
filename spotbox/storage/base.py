"""The storage protocol every backend implements, and what the two backends share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from spotbox.status import RESEND_WINDOW, StatusRecord, StatusRow, StoredStatus

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
# What a write adds to COLUMNS: the delivery key of a QoS 1/2 status without a timestamp (null otherwise).
WRITE_COLUMNS = (*COLUMNS, "delivery_key")


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """One page of one robot's history, ordered by (ts, id)."""

    serial_number: str
    start: datetime | None = None
    end: datetime | None = None
    after: tuple[datetime, int] | None = None
    limit: int = 500


# Raw payload bytes one history page may hold (include_payload=true): past them the page ends early, with a cursor
# to the rest, so that a request's memory does not grow with --max-payload times `limit`.
PAGE_PAYLOAD_BUDGET = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of history ready to send: its statuses as one JSON array, and the (ts, id) the next page follows."""

    items_json: bytes
    count: int
    next_after: tuple[datetime, int] | None


Aggregate = Literal["avg", "min", "max", "last", "count"]
AGGREGATES: tuple[Aggregate, ...] = ("avg", "min", "max", "last", "count")


@dataclass(frozen=True, slots=True)
class DownsampleQuery:
    """One robot's battery level (and position, for `last`) per time bucket, buckets aligned on the Unix epoch."""

    serial_number: str
    interval: timedelta
    agg: Aggregate
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class Bucket:
    """One downsampled bucket: its start, its row count, and the aggregate (a float for avg, None for count)."""

    start: datetime
    count: int
    battery_level: float | int | None
    location: tuple[float, float, float] | None = None


class Storage(Protocol):
    """Where validated statuses are kept. One writer calls `write_batch`; readers may run concurrently."""

    async def open(self) -> None:
        """Connect, then create or migrate the schema."""

    async def write_batch(self, records: Sequence[StatusRecord]) -> list[int | None]:
        """Commit `records` in one transaction; the row id of each, or None for a duplicate already stored."""

    async def history(self, query: HistoryQuery) -> list[StoredStatus]:
        """Up to `query.limit` rows of one robot, oldest first, raw payloads included."""

    async def history_page(self, query: HistoryQuery, include_payload: bool) -> HistoryPage:
        """A page of up to `query.limit` statuses of one robot in (ts, id) order, as the API shows them.

        Raw payloads are read only with `include_payload`, and then at most PAGE_PAYLOAD_BUDGET bytes of them (but
        always one row): a page cut short by them has a `next_after` like a full one.
        """

    async def robot_exists(self, serial_number: str) -> bool:
        """True once any status of this robot is stored."""

    async def statuses_after(self, after_id: int, limit: int) -> list[StoredStatus]:
        """Up to `limit` rows of every robot with id greater than `after_id`, by id, raw payloads included."""

    async def rows_after(self, serial_number: str | None, after_id: int, limit: int) -> list[StatusRow]:
        """Up to `limit` rows with id greater than `after_id`, by id: of one robot, or of the fleet for None."""

    async def latest(self, serial_number: str) -> StatusRow | None:
        """The robot's row with the greatest (ts, id), or None for a robot never seen."""

    async def latest_per_robot(self) -> list[StatusRow]:
        """The latest row (by ts, id) of every robot, ordered by serial number."""

    async def last_received(self, serial_number: str | None = None) -> dict[str, datetime]:
        """When the most recently stored status of each robot (or of one) was received: its `last_seen`."""

    async def time_range(self, serial_number: str) -> tuple[datetime, datetime] | None:
        """The first and last ts of the robot's rows, or None for a robot never seen."""

    async def downsample(self, query: DownsampleQuery) -> list[Bucket]:
        """The non-empty buckets of `query`, oldest first, aggregated by the database."""

    async def delete_before(self, cutoff: datetime, limit: int, *, keep_after_id: int | None = None) -> int:
        """Delete at most `limit` rows with ts before `cutoff` in one short transaction; how many went.

        Rows with an id greater than `keep_after_id` are kept whatever their age (not yet forwarded upstream).
        """

    async def forward_cursor(self, target: str) -> int:
        """The last row id the upstream broker `target` acknowledged (0 for a target never seen)."""

    async def save_forward_cursor(self, target: str, row_id: int) -> None:
        """Durably record that `target` acknowledged every row up to `row_id`."""

    async def count_after(self, after_id: int) -> int:
        """How many rows have an id greater than `after_id` (a forward target's lag)."""

    def db_time(self, moment: datetime) -> Any:
        """A datetime as a parameter of this backend's time columns."""

    def from_db_time(self, value: Any) -> datetime:
        """A value of this backend's time columns as an aware UTC datetime."""

    async def execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run write statements (`$n` placeholders) in one transaction; the row count of each.

        For the small operations tables (registry, alerts, rejections), whose SQL both backends share.
        """

    async def query(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        """The rows of one read statement (`$n` placeholders)."""

    async def ping(self) -> None:
        """Raise StorageUnavailableError unless the database answers."""

    async def close(self) -> None:
        """Release connections; safe to call twice."""


def resent_keys(records: Sequence[StatusRecord]) -> list[bytes]:
    """The delivery keys of the resends (DUP) in `records`, to look up among recent rows before inserting."""
    return [record.delivery_key for record in records if record.resend and record.delivery_key is not None]


def resend_cutoff(records: Sequence[StatusRecord]) -> datetime:
    """Rows received before this are too old to be the first delivery of any resend in `records`."""
    return min(record.received_at for record in records if record.resend) - RESEND_WINDOW


def without_resent(records: Sequence[StatusRecord], stored: Iterable[tuple[bytes, datetime]]) -> list[StatusRecord]:
    """`records` without the resends whose delivery is a stored row received within RESEND_WINDOW before them:
    those are duplicates, not written again. `stored` is (delivery key, received_at) of candidate rows."""
    latest: dict[bytes, datetime] = {}
    for key, received_at in stored:
        latest[key] = max(received_at, latest.get(key, received_at))
    if not latest:
        return list(records)
    return [
        record
        for record in records
        if not (
            record.resend
            and record.delivery_key in latest
            and latest[record.delivery_key] >= record.received_at - RESEND_WINDOW
        )
    ]


def assign_ids(records: Sequence[StatusRecord], returned: dict[tuple[str, int, bytes], int]) -> list[int | None]:
    """Map the rows an INSERT ... ON CONFLICT DO NOTHING RETURNING gave back onto the batch, in batch order.

    RETURNING order is unspecified, so rows are matched by their dedup key; a record whose key was not returned
    (already stored), or that repeats an earlier record of the same batch, is a duplicate: None.
    """
    return [returned.pop(record.dedup_key, None) for record in records]


# The robots seen, one index probe each on (serial_number, ts, id): a loose index scan, so listing the fleet
# costs per robot, not per stored row. The last step yields one NULL serial, which joins nothing.
ROBOTS_CTE = """
WITH RECURSIVE robots(serial) AS (
    SELECT min(serial_number) FROM status
    UNION ALL
    SELECT (SELECT min(serial_number) FROM status WHERE serial_number > robots.serial)
    FROM robots WHERE robots.serial IS NOT NULL
)"""


def latest_per_robot_sql(select: str, collate: str = "") -> str:
    """`select` ("SELECT columns FROM status") limited to each robot's latest row, found through the index.

    `collate` makes the final order byte order on every backend, whatever the database's locale.
    """
    return (
        f"{ROBOTS_CTE} {select} JOIN robots ON status.id = (SELECT s.id FROM status AS s "
        f"WHERE s.serial_number = robots.serial ORDER BY s.ts DESC, s.id DESC LIMIT 1) ORDER BY robots.serial{collate}"
    )


# Each robot's most recently stored row is its greatest id, found through the (serial_number, id) index: its
# receive time is when the robot was last seen, whatever the ts it claims.
LAST_RECEIVED_SQL = f"""{ROBOTS_CTE}
SELECT robots.serial, (SELECT s.received_at FROM status AS s WHERE s.serial_number = robots.serial
                       ORDER BY s.id DESC LIMIT 1)
FROM robots WHERE robots.serial IS NOT NULL"""


def last_received_one_sql(mark: str) -> str:
    """LAST_RECEIVED_SQL for one robot; `mark` is the backend's numbered placeholder."""
    return f"SELECT serial_number, received_at FROM status WHERE serial_number = {mark}1 ORDER BY id DESC LIMIT 1"


def latest_sql(select: str, mark: str) -> str:
    """`select` limited to one robot's latest row; `mark` is the backend's numbered placeholder ("?" or "$")."""
    return f"{select} WHERE serial_number = {mark}1 ORDER BY ts DESC, id DESC LIMIT 1"


def time_range_sql(mark: str) -> str:
    """First and last ts of one robot; two subqueries so that each is one index probe on every backend."""
    return (
        f"SELECT (SELECT min(ts) FROM status WHERE serial_number = {mark}1), "
        f"(SELECT max(ts) FROM status WHERE serial_number = {mark}1)"
    )


_LEVEL_AGGREGATES = {
    "avg": "CAST(avg(battery_level) AS DOUBLE PRECISION)",
    "min": "min(battery_level)",
    "max": "max(battery_level)",
    "count": "NULL",
}


def downsample_sql(agg: Aggregate, mark: str, bucket: str, time_cast: str = "") -> str:
    """The downsampling query: parameters 1 serial, 2 start, 3 end (each followed by `time_cast`); `bucket` is the
    backend's bucket start of ts.

    Columns: bucket start, row count, battery level aggregate, then latitude, longitude, height (`last` only).
    """
    where = f"serial_number = {mark}1 AND ts >= {mark}2{time_cast} AND ts <= {mark}3{time_cast}"
    if agg != "last":
        return (
            f"SELECT {bucket} AS bucket, count(*), {_LEVEL_AGGREGATES[agg]}, NULL, NULL, NULL "
            f"FROM status WHERE {where} GROUP BY 1 ORDER BY 1"
        )
    # The last row of a bucket is the one with the greatest (ts, id), the order history pages use.
    return f"""
    WITH picked AS (
        SELECT {bucket} AS bucket, ts, id, battery_level, latitude, longitude, height FROM status WHERE {where}
    ), ranked AS (
        SELECT bucket, count(*) OVER (PARTITION BY bucket) AS n,
               row_number() OVER (PARTITION BY bucket ORDER BY ts DESC, id DESC) AS recency,
               battery_level, latitude, longitude, height
        FROM picked
    )
    SELECT bucket, n, battery_level, latitude, longitude, height FROM ranked WHERE recency = 1 ORDER BY bucket
    """


def bucket_of(start: datetime, row: Sequence[Any]) -> Bucket:
    """A Bucket from a row of `downsample_sql`, its start already converted by the backend."""
    count, level, latitude, longitude, height = row[1:6]
    location = None if latitude is None else (latitude, longitude, height)
    return Bucket(start, count, level, location)
