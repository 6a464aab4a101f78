"""SQLite storage: one writer thread and connection in WAL mode, and a pool of reader threads beside it."""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from spotbox.errors import StorageConflictError, StorageError, StorageUnavailableError
from spotbox.status import StatusRecord, StatusRow, StoredStatus, from_micros, to_micros
from spotbox.storage import base, sqlite_read, sqlite_write
from spotbox.storage.base import (
    COLUMNS,
    PAGE_PAYLOAD_BUDGET,
    Bucket,
    DownsampleQuery,
    HistoryPage,
    HistoryQuery,
)
from spotbox.storage.lock import DatabaseLock
from spotbox.storage.sqlite_library import without_memory_statistics
from spotbox.storage.sqlite_read import API_SELECT, ReadPool, status_row
from spotbox.storage.sqlite_write import WriterThread, transaction

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Each entry migrates the schema from version N to N+1. Never edit a released step: append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE status (
            id INTEGER PRIMARY KEY,
            serial_number TEXT NOT NULL,
            ts INTEGER NOT NULL,           -- microseconds since the Unix epoch, UTC
            received_at INTEGER NOT NULL,  -- same unit
            battery_level INTEGER NOT NULL,
            battery_status TEXT NOT NULL,
            driving_status TEXT NOT NULL,
            current_drive_id TEXT,
            latitude REAL NOT NULL,
            longitude REAL NOT NULL,
            height REAL NOT NULL,
            payload TEXT NOT NULL,
            payload_hash BLOB NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX status_dedup ON status (serial_number, ts, payload_hash)",
        "CREATE INDEX status_robot_time ON status (serial_number, ts, id)",
    ),
    # A feed resuming from Last-Event-ID reads one robot's rows after an id; the fleet feed uses the primary key.
    ("CREATE INDEX status_robot_id ON status (serial_number, id)",),
    # History pages read every column the API shows from the index alone (no lookup of each row in the table,
    # half a page's cost); it replaces the (serial_number, ts, id) index, whose queries it serves as well.
    (
        "CREATE INDEX status_robot_time_api ON status (serial_number, ts, id, received_at, battery_level, "
        "battery_status, driving_status, current_drive_id, latitude, longitude, height)",
        "DROP INDEX status_robot_time",
    ),
    # Store and forward: the last row id each upstream broker acknowledged.
    ("CREATE TABLE forward_cursor (target TEXT PRIMARY KEY, row_id INTEGER NOT NULL)",),
    # What identifies the MQTT delivery of a status without a timestamp, so that a resend after a restart is
    # stored once (see status.Delivery); null for every other row, which the partial index leaves out.
    (
        "ALTER TABLE status ADD COLUMN delivery_key BLOB",
        "CREATE INDEX status_delivery ON status (delivery_key) WHERE delivery_key IS NOT NULL",
    ),
    # Operations (issue 13): the registered fleet, alerts with their transitions, and the bounded rejection record.
    (
        """
        CREATE TABLE robot (
            serial_number TEXT PRIMARY KEY,
            name TEXT, model TEXT, site TEXT,
            tags TEXT NOT NULL,            -- a JSON array of strings
            registered_at INTEGER NOT NULL,
            updated_at INTEGER NOT NULL
        )
        """,
        """
        CREATE TABLE alert (
            id TEXT PRIMARY KEY,
            rule TEXT NOT NULL,
            serial_number TEXT NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL,
            acknowledged INTEGER NOT NULL,
            ack_by TEXT,
            ack_at INTEGER,
            created_at INTEGER NOT NULL,
            activated_at INTEGER,
            cleared_at INTEGER,
            updated_at INTEGER NOT NULL,
            value REAL,
            message TEXT NOT NULL
        )
        """,
        "CREATE INDEX alert_created ON alert (created_at, id)",
        "CREATE INDEX alert_open ON alert (state, acknowledged)",
        """
        CREATE TABLE alert_transition (
            id INTEGER PRIMARY KEY,
            alert_id TEXT NOT NULL,
            at INTEGER NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            by_user TEXT
        )
        """,
        "CREATE INDEX alert_transition_alert ON alert_transition (alert_id, id)",
        """
        CREATE TABLE rejection (
            id INTEGER PRIMARY KEY,
            serial_number TEXT NOT NULL,
            received_at INTEGER NOT NULL,
            field TEXT NOT NULL,
            reason TEXT NOT NULL,
            payload BLOB NOT NULL
        )
        """,
        "CREATE INDEX rejection_robot ON rejection (serial_number, id)",
        "CREATE INDEX rejection_time ON rejection (received_at)",
    ),
    # As on PostgreSQL (where instances share the tables): who wrote each alert transition, one alert in progress
    # per rule and robot.
    (
        "ALTER TABLE alert_transition ADD COLUMN writer TEXT",
        # An older alert left in progress beside a newer one of the same rule and robot (a lost write) ends.
        "UPDATE alert SET state = 'cleared', cleared_at = updated_at WHERE state <> 'cleared' AND EXISTS (SELECT 1 "
        "FROM alert AS newer WHERE newer.rule = alert.rule AND newer.serial_number = alert.serial_number AND "
        "newer.state <> 'cleared' AND (newer.created_at, newer.id) > (alert.created_at, alert.id))",
        "CREATE UNIQUE INDEX alert_one_current ON alert (rule, serial_number) WHERE state <> 'cleared'",
    ),
    # Issue 12's reads: each row's API JSON, written once by SQLite, kept in the history index (about 330 bytes a
    # row), which replaces the one before it: besides the JSON it covers what downsampled history reads (pages of
    # rows stored before this step read the table for the rest). `location_json` is the location object as orjson
    # writes it (about 55 bytes a row in the table).
    (
        "ALTER TABLE status ADD COLUMN location_json TEXT",
        f"ALTER TABLE status ADD COLUMN api_item TEXT GENERATED ALWAYS AS ({sqlite_read.API_ITEM}) VIRTUAL",
        "CREATE INDEX status_robot_page ON status (serial_number, ts, id, battery_level, latitude, longitude, "
        "height, api_item)",
        "DROP INDEX status_robot_time_api",
    ),
)

_SELECT = "SELECT id, " + ", ".join(COLUMNS) + " FROM status"
# Floor of ts (integer microseconds) to a multiple of the interval, also before 1970 where % is negative; not
# before 0001-01-01T00:00:00Z, the first instant a datetime holds (the first bucket of a robot whose clock was
# never set starts there).
_BUCKET = f"max(ts - ((ts % ?4) + ?4) % ?4, {to_micros(datetime.min.replace(tzinfo=UTC))})"
# Each robot's old rows through the (serial_number, ts, id) index; no full scan to find what to delete.
# (The statement starts with DELETE, not WITH, so that sqlite3 reports its rowcount.)
# The row with the greatest id is never deleted: SQLite gives a new row max(id) + 1, so deleting it would hand its
# id (and those before it) out again, and a feed resuming from Last-Event-ID would skip the new rows.
_DELETE_BEFORE = f"""
DELETE FROM status WHERE id IN ({base.ROBOTS_CTE}
    SELECT s.id FROM robots JOIN status AS s ON s.serial_number = robots.serial AND s.ts < ?1 AND s.id <= ?3 LIMIT ?2
) AND id < (SELECT max(id) FROM status)"""
# Rows no forward target still needs: every id when nothing is forwarded.
_NO_KEEP = 2**63 - 1


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """PostgreSQL's `$1` placeholders as SQLite's `?1`, so that the operations tables share their SQL.

    Cached: the operations code has a few dozen statements, and a burst of alert changes (a fleet's batteries
    low in the same second) runs them tens of thousands of times."""
    return re.sub(r"\$(\d+)", r"?\1", sql)


def _rowcount(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> int:
    cursor = conn.execute(sql, params)
    count = cursor.rowcount
    cursor.close()
    return count


def _rowcounts(conn: sqlite3.Connection, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
    return [_rowcount(conn, sql, params) for sql, params in statements]


def _stored(row: sqlite3.Row) -> StoredStatus:
    return StoredStatus(
        id=row[0],
        record=StatusRecord(
            serial_number=row[1],
            ts=from_micros(row[2]),
            received_at=from_micros(row[3]),
            battery_level=row[4],
            battery_status=row[5],
            driving_status=row[6],
            current_drive_id=row[7],
            latitude=row[8],
            longitude=row[9],
            height=row[10],
            payload=row[11].encode(),
            payload_hash=row[12],
        ),
    )


class SQLiteStorage:
    """Status rows in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: WriterThread | None = None
        self._readers: ReadPool | None = None
        self._file_lock = DatabaseLock(path)

    async def open(self) -> None:
        """Open the file (created if missing), switch to WAL and migrate."""
        if not self.path.parent.is_dir():
            raise StorageError(f"cannot open SQLite database {self.path}: folder {self.path.parent} does not exist")
        without_memory_statistics()
        self._file_lock.acquire()
        writer = self._writer = WriterThread(self.path)
        try:
            await writer.open()
        except sqlite3.Error as exc:
            await self.close()
            raise StorageError(f"cannot open SQLite database {self.path}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        try:
            await writer.run(self._prepare)
        except sqlite3.Error as exc:
            await self.close()
            raise StorageError(f"cannot prepare SQLite database {self.path}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        self._readers = ReadPool(self.path)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed batch survives power loss as well as a crash, since acks wait for it.
        conn.execute("PRAGMA synchronous = FULL")
        version = transaction(conn, self._migrate)
        if version < len(MIGRATIONS):
            logger.info("sqlite schema of %s migrated from version %d to %d", self.path, version, len(MIGRATIONS))

    def _migrate(self, conn: sqlite3.Connection) -> int:
        """Bring the schema to the latest version (in the caller's transaction); the version it was at."""
        conn.execute("CREATE TABLE IF NOT EXISTS spotbox_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM spotbox_schema").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StorageError(
                f"{self.path} has schema version {version}, newer than this spotbox knows ({len(MIGRATIONS)})"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if row is None:
            conn.execute("INSERT INTO spotbox_schema (version) VALUES (?)", (len(MIGRATIONS),))
        elif version < len(MIGRATIONS):
            conn.execute("UPDATE spotbox_schema SET version = ?", (len(MIGRATIONS),))
        return version

    async def _write(self, what: str, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in the writer thread, its SQLite errors as storage errors."""
        if self._writer is None:
            raise StorageUnavailableError(f"SQLite database {self.path} is not open")
        try:
            return await self._writer.run(work, *args)
        except sqlite3.OperationalError as exc:
            # Locked, disk full, I/O error: the write may succeed when retried.
            raise StorageUnavailableError(f"SQLite {what} failed: {exc}") from exc
        except sqlite3.IntegrityError as exc:
            raise StorageConflictError(f"SQLite {what} failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite {what} failed: {exc}") from exc

    async def write_batch(self, records: Sequence[StatusRecord]) -> list[int | None]:
        """Insert the batch in one transaction; duplicates are skipped by the unique dedup index."""
        return await self._write("write", sqlite_write.write_batch, records)

    async def history(self, query: HistoryQuery) -> list[StoredStatus]:
        """Rows of one robot in (ts, id) order, after the cursor, within the time range, payloads included."""
        where, params = sqlite_read.history_where(query)
        sql = f"{_SELECT} WHERE {where} ORDER BY ts, id LIMIT ?"
        return [_stored(row) for row in await self._fetch(sql, [*params, query.limit])]

    async def history_page(self, query: HistoryQuery, include_payload: bool) -> HistoryPage:
        """One page as JSON, built in a reader thread; payloads read only when asked for, within the budget."""
        sql, params = sqlite_read.history_sql(query, include_payload)
        if include_payload:
            return await self._pool().run(sqlite_read.history_page, sql, params, query.limit, PAGE_PAYLOAD_BUDGET)
        text_sql, text_params = sqlite_read.history_text_sql(query)
        return await self._pool().run(sqlite_read.history_page_text, text_sql, text_params, sql, params, query.limit)

    async def robot_exists(self, serial_number: str) -> bool:
        """True once a row of this robot is stored."""
        rows = await self._fetch("SELECT 1 FROM status WHERE serial_number = ? LIMIT 1", [serial_number])
        return bool(rows)

    async def statuses_after(self, after_id: int, limit: int) -> list[StoredStatus]:
        """Rows after `after_id` in id order, payloads included (what store and forward sends)."""
        return [
            _stored(row) for row in await self._fetch(f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", [after_id, limit])
        ]

    async def rows_after(self, serial_number: str | None, after_id: int, limit: int) -> list[StatusRow]:
        """Rows with id greater than `after_id` in id order, of one robot or (None) of every robot; no payloads."""
        if serial_number is None:
            rows = await self._fetch(f"{API_SELECT} WHERE id > ? ORDER BY id LIMIT ?", [after_id, limit])
        else:
            sql = f"{API_SELECT} WHERE serial_number = ? AND id > ? ORDER BY id LIMIT ?"
            rows = await self._fetch(sql, [serial_number, after_id, limit])
        return [status_row(row) for row in rows]

    async def latest(self, serial_number: str) -> StatusRow | None:
        """The robot's row with the greatest (ts, id); no payload."""
        rows = await self._fetch(base.latest_sql(API_SELECT, "?"), [serial_number])
        return status_row(rows[0]) if rows else None

    async def latest_per_robot(self) -> list[StatusRow]:
        """The latest row of every robot, by serial number; no payloads."""
        return [status_row(row) for row in await self._fetch(base.latest_per_robot_sql(API_SELECT), [])]

    async def last_received(self, serial_number: str | None = None) -> dict[str, datetime]:
        """When the most recently stored status of each robot (or of one) was received."""
        if serial_number is None:
            rows = await self._fetch(base.LAST_RECEIVED_SQL, [])
        else:
            rows = await self._fetch(base.last_received_one_sql("?"), [serial_number])
        return {serial: from_micros(received) for serial, received in rows}

    async def time_range(self, serial_number: str) -> tuple[datetime, datetime] | None:
        """The first and last ts of the robot."""
        ((first, last),) = await self._fetch(base.time_range_sql("?"), [serial_number])
        return None if first is None else (from_micros(first), from_micros(last))

    async def downsample(self, query: DownsampleQuery) -> list[Bucket]:
        """Buckets computed by SQLite over integer microseconds."""
        params = (
            query.serial_number,
            to_micros(query.start),
            to_micros(query.end),
            query.interval // timedelta(microseconds=1),
        )
        rows = await self._fetch(base.downsample_sql(query.agg, "?", _BUCKET), params)
        return [base.bucket_of(from_micros(row[0]), row) for row in rows]

    async def delete_before(self, cutoff: datetime, limit: int, *, keep_after_id: int | None = None) -> int:
        """One DELETE of at most `limit` old rows on the writer connection, between two ingest batches."""
        keep = _NO_KEEP if keep_after_id is None else keep_after_id
        return await self._write("delete", _rowcount, _DELETE_BEFORE, (to_micros(cutoff), limit, keep))

    async def forward_cursor(self, target: str) -> int:
        """The target's acknowledged row id, 0 when it has none yet."""
        rows = await self._fetch("SELECT row_id FROM forward_cursor WHERE target = ?", [target])
        return int(rows[0][0]) if rows else 0

    async def save_forward_cursor(self, target: str, row_id: int) -> None:
        """Upsert the cursor on the writer connection (SQLite's one writer), committed before returning."""
        sql = (
            "INSERT INTO forward_cursor (target, row_id) VALUES (?, ?) "
            "ON CONFLICT (target) DO UPDATE SET row_id = excluded.row_id"
        )
        try:
            await self._write("write", _rowcount, sql, (target, row_id))
        except StorageError as exc:
            raise StorageUnavailableError(str(exc)) from exc

    async def count_after(self, after_id: int) -> int:
        """Rows past `after_id`, counted on the primary key."""
        ((count,),) = await self._fetch("SELECT count(*) FROM status WHERE id > ?", [after_id])
        return int(count)

    def db_time(self, moment: datetime) -> int:
        """A datetime as this backend stores it: integer microseconds."""
        return to_micros(moment)

    def from_db_time(self, value: Any) -> datetime:
        """A stored time back as an aware UTC datetime."""
        return from_micros(value)

    async def execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run write statements (numbered `$n` placeholders) in one transaction; each one's row count."""
        numbered = [(_numbered(sql), params) for sql, params in statements]
        return await self._write("write", transaction, _rowcounts, numbered)

    async def query(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        """Rows of a read statement with numbered `$n` placeholders."""
        return list(await self._fetch(_numbered(sql), params))

    async def ping(self) -> None:
        """Run a trivial query on the reader connection."""
        await self._fetch("SELECT 1", [])

    def _pool(self) -> ReadPool:
        if self._readers is None:
            raise StorageUnavailableError(f"SQLite database {self.path} is not open")
        return self._readers

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return await self._pool().fetch(sql, params)

    async def close(self) -> None:
        """Close the readers and the writer."""
        if self._readers is not None:
            await self._readers.close()
        if self._writer is not None:
            await self._writer.close()
        self._readers = self._writer = None
        self._file_lock.release()
