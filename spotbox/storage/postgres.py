"""PostgreSQL storage: an asyncpg pool, batches inserted with one unnest() statement per transaction."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from spotbox.errors import StorageError, StorageUnavailableError
from spotbox.status import StatusRecord, StoredStatus, to_micros
from spotbox.storage import base
from spotbox.storage.base import COLUMNS, Bucket, DownsampleQuery, HistoryQuery, assign_ids

logger = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE status (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            serial_number text NOT NULL,
            ts timestamptz NOT NULL,
            received_at timestamptz NOT NULL,
            battery_level smallint NOT NULL,
            battery_status text NOT NULL,
            driving_status text NOT NULL,
            current_drive_id uuid,
            latitude double precision NOT NULL,
            longitude double precision NOT NULL,
            height double precision NOT NULL,
            payload jsonb NOT NULL,
            payload_hash bytea NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX status_dedup ON status (serial_number, ts, payload_hash)",
        "CREATE INDEX status_robot_time ON status (serial_number, ts, id)",
    ),
    # A feed resuming from Last-Event-ID reads one robot's rows after an id; the fleet feed uses the primary key.
    ("CREATE INDEX status_robot_id ON status (serial_number, id)",),
    # Store and forward: the last row id each upstream broker acknowledged.
    ("CREATE TABLE forward_cursor (target text PRIMARY KEY, row_id bigint NOT NULL)",),
    # Cluster mode: when each instance first received the status without a timestamp that is in flight under a
    # packet id of its session, so that a redelivery (DUP) gets the same ts and is stored once.
    (
        """
        CREATE TABLE cluster_delivery (
            session text NOT NULL,
            packet_id integer NOT NULL,
            payload_hash bytea NOT NULL,
            received_at timestamptz NOT NULL,
            PRIMARY KEY (session, packet_id)
        )
        """,
        # Each instance's last hour of ingest counts (GET /stats), so that any instance answers for all of them.
        "CREATE TABLE instance_stats (instance text PRIMARY KEY, updated_at timestamptz NOT NULL, "
        "snapshot jsonb NOT NULL)",
    ),
)

# Any number that fits one transaction: serializes concurrent spotbox starts on one database.
_MIGRATION_LOCK = 0x5B07B0C5
# Every transaction that inserts statuses holds this lock from before its first id is drawn until it commits, so
# row ids are in commit order across every instance sharing the database: a reader that has seen row N has seen
# every row below N, and a feed resuming after N skips nothing (an identity column alone hands out ids at insert
# time, and a transaction with lower ids may commit later).
_COMMIT_ORDER_LOCK = 0x5B07B0C6
# The wake-up of every instance's live feeds (LISTEN/NOTIFY): a small payload naming the writer, sent on commit.
STATUS_CHANNEL = "spotbox_status"
_LOCK_AND_NOTIFY = f"SELECT pg_advisory_xact_lock($1), pg_notify('{STATUS_CHANNEL}', $2)"

_INSERT = f"""
INSERT INTO status ({", ".join(COLUMNS)})
SELECT s, t, r, b, bs, ds, d::uuid, la, lo, h, p::jsonb, ph
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::smallint[], $5::text[], $6::text[],
            $7::text[], $8::float8[], $9::float8[], $10::float8[], $11::text[], $12::bytea[])
     AS u(s, t, r, b, bs, ds, d, la, lo, h, p, ph)
ON CONFLICT (serial_number, ts, payload_hash) DO NOTHING
RETURNING id, serial_number, ts, payload_hash
"""
_SELECT = (
    "SELECT id, serial_number, ts, received_at, battery_level, battery_status, driving_status, "
    "current_drive_id::text, latitude, longitude, height, payload::text, payload_hash FROM status"
)
# Buckets aligned on the Unix epoch, like SQLite's; date_bin is exact (integer microseconds inside).
_BUCKET = "date_bin($4::interval, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
# LATERAL makes the planner probe the (serial_number, ts, id) index robot by robot instead of scanning.
_DELETE_BEFORE = f"""{base.ROBOTS_CTE}
DELETE FROM status WHERE id = ANY(ARRAY(
    SELECT old.id FROM robots
    CROSS JOIN LATERAL (
        SELECT id FROM status WHERE serial_number = robots.serial AND ts < $1 AND id <= $3 LIMIT $2
    ) AS old
    LIMIT $2
))"""

# What a lost or refused connection looks like; anything else is a real error in the statement or data.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # Class 57: the server is shutting down, crashed, starting up or cancelled the statement.
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
)


def _stored(row: asyncpg.Record) -> StoredStatus:
    return StoredStatus(
        id=row[0],
        record=StatusRecord(
            serial_number=row[1],
            ts=row[2],
            received_at=row[3],
            battery_level=row[4],
            battery_status=row[5],
            driving_status=row[6],
            current_drive_id=row[7],
            latitude=row[8],
            longitude=row[9],
            height=row[10],
            payload=row[11].encode(),
            payload_hash=bytes(row[12]),
        ),
    )


class PostgresStorage:
    """Status rows in a PostgreSQL table."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        # The payload of this process's notifications, so that its own can be told from other instances'.
        self.writer_tag = uuid.uuid4().hex[:16]
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        """Create the pool and migrate; a server that cannot be reached is a StorageUnavailableError."""
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, timeout=10)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"cannot reach PostgreSQL: {exc}") from exc
        except (asyncpg.PostgresError, ValueError) as exc:
            raise StorageError(f"cannot open PostgreSQL database: {exc}") from exc
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _migrate(self) -> None:
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS spotbox_schema (version integer NOT NULL)")
            version = await conn.fetchval("SELECT version FROM spotbox_schema")
            current = version or 0
            if current > len(MIGRATIONS):
                raise StorageError(
                    f"database has schema version {current}, newer than this spotbox knows ({len(MIGRATIONS)})"
                )
            for step in MIGRATIONS[current:]:
                for statement in step:
                    await conn.execute(statement)
            if version is None:
                await conn.execute("INSERT INTO spotbox_schema (version) VALUES ($1)", len(MIGRATIONS))
            elif current < len(MIGRATIONS):
                await conn.execute("UPDATE spotbox_schema SET version = $1", len(MIGRATIONS))
            if current < len(MIGRATIONS):
                logger.info("postgresql schema migrated from version %d to %d", current, len(MIGRATIONS))

    def _acquire(self) -> Any:
        if self._pool is None:
            raise StorageUnavailableError("PostgreSQL pool is not open")
        return self._pool.acquire(timeout=10)

    async def write_batch(self, records: Sequence[StatusRecord]) -> list[int | None]:
        """Insert the whole batch with one statement, in one transaction."""
        columns: list[list[Any]] = [[] for _ in COLUMNS]
        for record in records:
            for column, value in zip(columns, _values(record), strict=True):
                column.append(value)
        try:
            async with self._acquire() as conn, conn.transaction():
                await conn.execute(_LOCK_AND_NOTIFY, _COMMIT_ORDER_LOCK, self.writer_tag)
                rows = await conn.fetch(_INSERT, *columns)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL write failed: {exc!r}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL write failed: {exc}") from exc
        returned = {(row[1], to_micros(row[2]), bytes(row[3])): row[0] for row in rows}
        return assign_ids(records, returned)

    async def history(self, query: HistoryQuery) -> list[StoredStatus]:
        """Rows of one robot in (ts, id) order, after the cursor, within the time range."""
        clauses = ["serial_number = $1"]
        params: list[Any] = [query.serial_number]
        if query.start is not None:
            params.append(query.start)
            clauses.append(f"ts >= ${len(params)}")
        if query.end is not None:
            params.append(query.end)
            clauses.append(f"ts <= ${len(params)}")
        if query.after is not None:
            params.extend(query.after)
            clauses.append(f"(ts, id) > (${len(params) - 1}, ${len(params)})")
        params.append(query.limit)
        sql = f"{_SELECT} WHERE {' AND '.join(clauses)} ORDER BY ts, id LIMIT ${len(params)}"
        return [_stored(row) for row in await self._fetch(sql, params)]

    async def robot_exists(self, serial_number: str) -> bool:
        """True once a row of this robot is stored."""
        return bool(await self._fetch("SELECT 1 FROM status WHERE serial_number = $1 LIMIT 1", [serial_number]))

    async def rows_after(self, serial_number: str | None, after_id: int, limit: int) -> list[StoredStatus]:
        """Rows with id greater than `after_id` in id order, of one robot or (None) of every robot."""
        if serial_number is None:
            rows = await self._fetch(f"{_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", [after_id, limit])
        else:
            sql = f"{_SELECT} WHERE serial_number = $1 AND id > $2 ORDER BY id LIMIT $3"
            rows = await self._fetch(sql, [serial_number, after_id, limit])
        return [_stored(row) for row in rows]

    async def latest(self, serial_number: str) -> StoredStatus | None:
        """The robot's row with the greatest (ts, id)."""
        rows = await self._fetch(base.latest_sql(_SELECT, "$"), [serial_number])
        return _stored(rows[0]) if rows else None

    async def latest_per_robot(self) -> list[StoredStatus]:
        """The latest row of every robot, by serial number."""
        return [_stored(row) for row in await self._fetch(base.latest_per_robot_sql(_SELECT, ' COLLATE "C"'), [])]

    async def time_range(self, serial_number: str) -> tuple[datetime, datetime] | None:
        """The first and last ts of the robot."""
        ((first, last),) = await self._fetch(base.time_range_sql("$"), [serial_number])
        return None if first is None else (first, last)

    async def downsample(self, query: DownsampleQuery) -> list[Bucket]:
        """Buckets computed by PostgreSQL with date_bin."""
        params = (query.serial_number, query.start, query.end, query.interval)
        rows = await self._fetch(base.downsample_sql(query.agg, "$", _BUCKET), params)
        return [base.bucket_of(row[0], row) for row in rows]

    async def delete_before(self, cutoff: datetime, limit: int, *, keep_after_id: int | None = None) -> int:
        """One DELETE of at most `limit` old rows, in its own transaction."""
        keep = 2**63 - 1 if keep_after_id is None else keep_after_id
        try:
            async with self._acquire() as conn:
                status: str = await conn.execute(_DELETE_BEFORE, cutoff, limit, keep)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL delete failed: {exc!r}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL delete failed: {exc}") from exc
        return int(status.rsplit(" ", 1)[1])  # "DELETE <count>"

    async def forward_cursor(self, target: str) -> int:
        """The target's acknowledged row id, 0 when it has none yet."""
        rows = await self._fetch("SELECT row_id FROM forward_cursor WHERE target = $1", [target])
        return int(rows[0][0]) if rows else 0

    async def save_forward_cursor(self, target: str, row_id: int) -> None:
        """Upsert the cursor, committed before returning."""
        sql = (
            "INSERT INTO forward_cursor (target, row_id) VALUES ($1, $2) "
            "ON CONFLICT (target) DO UPDATE SET row_id = excluded.row_id"
        )
        await self._fetch(sql, [target, row_id])

    async def count_after(self, after_id: int) -> int:
        """Rows past `after_id`, counted on the primary key."""
        ((count,),) = await self._fetch("SELECT count(*) FROM status WHERE id > $1", [after_id])
        return int(count)

    async def first_delivery(self, session: str, packet_id: int, payload_hash: bytes) -> datetime | None:
        """When the status in flight under `packet_id` of `session` was first received, if it is this payload."""
        sql = "SELECT received_at FROM cluster_delivery WHERE session = $1 AND packet_id = $2 AND payload_hash = $3"
        rows = await self._fetch(sql, [session, packet_id, payload_hash])
        return rows[0][0] if rows else None

    async def remember_delivery(self, session: str, packet_id: int, payload_hash: bytes, received_at: datetime) -> None:
        """Record the first receive time of a status in flight under `packet_id` (replacing that id's last use)."""
        sql = (
            "INSERT INTO cluster_delivery (session, packet_id, payload_hash, received_at) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (session, packet_id) DO UPDATE SET payload_hash = excluded.payload_hash, "
            "received_at = excluded.received_at"
        )
        await self._fetch(sql, [session, packet_id, payload_hash, received_at])

    async def committed_after(self, after_id: int, limit: int) -> list[StoredStatus]:
        """Rows of every robot after `after_id`, by id: the live feeds' source (spotbox/cluster/rows.py)."""
        rows = await self._fetch(f"{_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", [after_id, limit])
        return [_stored(row) for row in rows]

    async def save_instance_stats(self, instance: str, snapshot: bytes) -> None:
        """Store this instance's /stats snapshot (JSON) under its name."""
        sql = (
            "INSERT INTO instance_stats (instance, updated_at, snapshot) VALUES ($1, now(), $2::jsonb) "
            "ON CONFLICT (instance) DO UPDATE SET updated_at = now(), snapshot = excluded.snapshot"
        )
        await self._fetch(sql, [instance, snapshot.decode()])

    async def instance_stats(self, since_s: float) -> dict[str, bytes]:
        """The /stats snapshots (JSON) of the instances that saved one within the last `since_s` seconds."""
        sql = "SELECT instance, snapshot::text FROM instance_stats WHERE updated_at > now() - make_interval(secs => $1)"
        return {row[0]: row[1].encode() for row in await self._fetch(sql, [since_s])}

    async def max_id(self) -> int:
        """The greatest row id (0 for an empty table)."""
        ((value,),) = await self._fetch("SELECT coalesce(max(id), 0) FROM status", [])
        return int(value)

    async def ping(self) -> None:
        """Run a trivial query."""
        await self._fetch("SELECT 1", [])

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[asyncpg.Record]:
        try:
            async with self._acquire() as conn:
                return list(await conn.fetch(sql, *params))
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL read failed: {exc!r}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL read failed: {exc}") from exc

    async def close(self) -> None:
        """Close the pool, waiting briefly for connections in use."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except TimeoutError:
                pool.terminate()


def _values(record: StatusRecord) -> tuple[Any, ...]:
    return (
        record.serial_number,
        record.ts,
        record.received_at,
        record.battery_level,
        record.battery_status,
        record.driving_status,
        record.current_drive_id,
        record.latitude,
        record.longitude,
        record.height,
        record.payload.decode(),
        record.payload_hash,
    )
