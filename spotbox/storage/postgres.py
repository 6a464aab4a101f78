"""PostgreSQL storage: an asyncpg pool, batches inserted with one statement per transaction."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from spotbox.errors import StorageConflictError, StorageError, StorageUnavailableError
from spotbox.status import StatusRecord, StatusRow, StoredStatus, api_items_json, dumps, location_json, parse_utc
from spotbox.storage import base
from spotbox.storage.base import (
    PAGE_PAYLOAD_BUDGET,
    WRITE_COLUMNS,
    Bucket,
    DownsampleQuery,
    HistoryPage,
    HistoryQuery,
)

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
    # History pages are index-only scans: every column the API shows is in the index (no heap fetch per row once
    # vacuum has marked the pages all-visible); it replaces the (serial_number, ts, id) index.
    (
        "CREATE INDEX status_robot_time_api ON status (serial_number, ts, id) INCLUDE (received_at, battery_level, "
        "battery_status, driving_status, current_drive_id, latitude, longitude, height)",
        "DROP INDEX status_robot_time",
    ),
    # Store and forward: the last row id each upstream broker acknowledged.
    ("CREATE TABLE forward_cursor (target text PRIMARY KEY, row_id bigint NOT NULL)",),
    # What identifies the MQTT delivery of a status without a timestamp, so that a resend after a restart is
    # stored once (see status.Delivery); null for every other row, which the partial index leaves out.
    (
        "ALTER TABLE status ADD COLUMN delivery_key bytea",
        "CREATE INDEX status_delivery ON status (delivery_key) WHERE delivery_key IS NOT NULL",
    ),
    # Operations (issue 13): the registered fleet, alerts with their transitions, and the bounded rejection record.
    (
        """
        CREATE TABLE robot (
            serial_number text PRIMARY KEY,
            name text, model text, site text,
            tags text NOT NULL,
            registered_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )
        """,
        """
        CREATE TABLE alert (
            id text PRIMARY KEY,
            rule text NOT NULL,
            serial_number text NOT NULL,
            severity text NOT NULL,
            state text NOT NULL,
            acknowledged boolean NOT NULL,
            ack_by text,
            ack_at timestamptz,
            created_at timestamptz NOT NULL,
            activated_at timestamptz,
            cleared_at timestamptz,
            updated_at timestamptz NOT NULL,
            value double precision,
            message text NOT NULL
        )
        """,
        "CREATE INDEX alert_created ON alert (created_at, id)",
        "CREATE INDEX alert_open ON alert (state, acknowledged)",
        """
        CREATE TABLE alert_transition (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            alert_id text NOT NULL,
            at timestamptz NOT NULL,
            from_state text,
            to_state text NOT NULL,
            by_user text
        )
        """,
        "CREATE INDEX alert_transition_alert ON alert_transition (alert_id, id)",
        """
        CREATE TABLE rejection (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            serial_number text NOT NULL,
            received_at timestamptz NOT NULL,
            field text NOT NULL,
            reason text NOT NULL,
            payload bytea NOT NULL
        )
        """,
        "CREATE INDEX rejection_robot ON rejection (serial_number, id)",
        "CREATE INDEX rejection_time ON rejection (received_at)",
    ),
    # Each instance's last hour of ingest counts (GET /stats), so that any instance sharing the database answers
    # for all of them.
    (
        "CREATE TABLE instance_stats (instance text PRIMARY KEY, updated_at timestamptz NOT NULL, "
        "snapshot jsonb NOT NULL)",
    ),
    # Operations shared by instances (issue 15): which instance wrote each alert transition (the others follow
    # it), at most one alert in progress per rule and robot whichever instance opens it, and the ends of robots'
    # MQTT connections, which only the instance that held the connection sees.
    (
        "ALTER TABLE alert_transition ADD COLUMN writer text",
        # An older alert left in progress beside a newer one of the same rule and robot (a lost write) ends.
        "UPDATE alert SET state = 'cleared', cleared_at = updated_at WHERE state <> 'cleared' AND EXISTS (SELECT 1 "
        "FROM alert AS newer WHERE newer.rule = alert.rule AND newer.serial_number = alert.serial_number AND "
        "newer.state <> 'cleared' AND (newer.created_at, newer.id) > (alert.created_at, alert.id))",
        "CREATE UNIQUE INDEX alert_one_current ON alert (rule, serial_number) WHERE state <> 'cleared'",
        "CREATE TABLE presence_event (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, serial_number text "
        "NOT NULL, at timestamptz NOT NULL, last_seen timestamptz, writer text NOT NULL)",
    ),
    # Issue 12's reads: each row's API JSON after its id (`api_rest`), written by the INSERT, kept in the history
    # index, which replaces the one before it: besides the JSON it covers what downsampled history reads (pages
    # of rows stored before this step read the heap for the rest).
    (
        "ALTER TABLE status ADD COLUMN api_rest text",
        "CREATE INDEX status_robot_page ON status (serial_number, ts, id) INCLUDE (battery_level, latitude, "
        "longitude, height, api_rest)",
        "DROP INDEX status_robot_time_api",
    ),
)

# Any number that fits one transaction: serializes concurrent spotbox starts on one database.
_MIGRATION_LOCK = 0x5B07B0C5
# Every transaction that inserts statuses holds this lock from before its first id is drawn until it commits, so
# row ids are in commit order across every instance sharing the database: a reader that has seen row N has seen
# every row below N, and a feed resuming after N skips nothing (an identity column alone hands out ids at insert
# time, and a transaction with lower ids may commit later).
COMMIT_ORDER_LOCK = 0x5B07B0C6
# The wake-up of every instance's live feeds (LISTEN/NOTIFY): a small payload naming the writer, sent on commit.
STATUS_CHANNEL = "spotbox_status"
_LOCK_AND_NOTIFY = f"SELECT pg_advisory_xact_lock($1), pg_notify('{STATUS_CHANNEL}', $2)"
# Operations changes (alert transitions, registry changes, connection ends) are committed in one order across
# instances under this lock, and wake the other instances on OPS_CHANNEL (payload: "{kind} {writer_tag}").
OPS_ORDER_LOCK = 0x5B07B0C7
OPS_CHANNEL = "spotbox_ops"
# The one session lock held by the instance that evaluates alert rules for every instance (spotbox/cluster/ops.py).
ALERT_EVALUATOR_LOCK = 0x5B07B0C8

# StatusRow's columns: what the read routes show, no raw payload.
_API_SELECT = (
    "SELECT id, serial_number, ts, received_at, battery_level, battery_status, driving_status, "
    "current_drive_id::text, latitude, longitude, height"
)


def _iso(column: str) -> str:
    """SQL for a timestamptz as the text orjson writes for a UTC datetime: seconds, `.ffffff` unless 0, then Z."""
    return f"""replace(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '.000000', '') || 'Z'"""


def _float(column: str) -> str:
    """SQL for a float8 as orjson writes it, within _FLOATS_AS_ORJSON: the shortest exact text, `.0` when whole."""
    return f"CASE WHEN {column} = trunc({column}) THEN {column}::text || '.0' ELSE {column}::text END"


# Where PostgreSQL's shortest float text (extra_float_digits >= 1, the default) is orjson's: exponents start at
# 1e15 and below 1e-4 there, and orjson writes them differently.
_FLOATS_AS_ORJSON = " AND ".join(
    f"(abs({column}) >= 1e-4 AND abs({column}) < 1e15 OR {column} = 0)"
    for column in ("latitude", "longitude", "height")
)
# A status as one JSON object, written by PostgreSQL (format() costs it less than || or json_build_object).
# to_json escapes text exactly as orjson does (test); serial numbers (a pattern of their own) and uuids need none.
_ITEM_FORMAT = (
    '{"id":%s,"serial_number":"%s","ts":"%s","received_at":"%s","battery_level":%s,"battery_status":%s,'
    '"driving_status":%s,"current_drive_id":%s,"location":{"latitude":%s,"longitude":%s,"height":%s}}'
)
_ITEM_TEXT = (
    f"format('{_ITEM_FORMAT}', id, serial_number, {_iso('ts')}, {_iso('received_at')}, battery_level, "
    "to_json(battery_status), to_json(driving_status), coalesce('\"' || current_drive_id::text || '\"', 'null'), "
    f"{_float('latitude')}, {_float('longitude')}, {_float('height')})"
)
# A status's API object after its id ("serial_number" up to the closing brace), written by the INSERT from the
# typed values, the times as `_batch_json` wrote them (orjson's, as a read writes them; to_char cost PostgreSQL
# about 2 us a row) and the location object as orjson wrote it (its floats exactly orjson's, whatever their size).
_API_REST = (
    # A btree entry holds at most 2,704 bytes: a row whose texts could pass it (a schema of the user's own may
    # allow long statuses, and to_json may write a character as six) has none, and its page is formatted at read.
    "CASE WHEN octet_length(serial_number) + octet_length(battery_status) + octet_length(driving_status) <= 300 "
    'THEN format(\'"serial_number":"%s","ts":"%s","received_at":"%s","battery_level":%s,'
    '"battery_status":%s,"driving_status":%s,"current_drive_id":%s,"location":%s}\', '
    "serial_number, ts_text, received_at_text, battery_level, to_json(battery_status), "
    "to_json(driving_status), coalesce('\"' || current_drive_id::text || '\"', 'null'), location) END"
)
# The batch is one jsonb parameter, an array of rows in WRITE_COLUMNS order (see `_batch_json`): orjson writes it
# in C, where 13 array parameters cost asyncpg an abstract-class check on every element (about 4 us a status of
# the event loop's time, measured). Floats travel as their repr (exact, -0.0 included), times as RFC 3339 text
# as the API writes them (UTC, `Z`), digests as hex, the payload as the JSON document it is, and last the location
# object as orjson writes it (for `_API_REST`).
_INSERT_FROM = f"""
INSERT INTO status ({", ".join(WRITE_COLUMNS)}, api_rest)
SELECT {", ".join(WRITE_COLUMNS)}, {_API_REST} FROM (
    SELECT e->>0 AS serial_number, (e->>1)::timestamptz AS ts, (e->>2)::timestamptz AS received_at,
           (e->>3)::smallint AS battery_level, e->>4 AS battery_status, e->>5 AS driving_status,
           (e->>6)::uuid AS current_drive_id, (e->>7)::float8 AS latitude, (e->>8)::float8 AS longitude,
           (e->>9)::float8 AS height, e->10 AS payload, decode(e->>11, 'hex') AS payload_hash,
           decode(e->>12, 'hex') AS delivery_key, e->>13 AS location, e->>1 AS ts_text, e->>2 AS received_at_text
    FROM jsonb_array_elements($1::jsonb) AS e
) AS new"""
_INSERT_END = """
ON CONFLICT (serial_number, ts, payload_hash) DO NOTHING
RETURNING id, serial_number, ts, payload_hash
"""
# In a transaction that took the commit-order lock already.
_INSERT = _INSERT_FROM + _INSERT_END
# The usual batch in one statement, so one round trip (the four of BEGIN, the lock, the INSERT and COMMIT each
# waited for the event loop's next turn, about 7 ms a batch under load): run alone, it is its own transaction,
# acknowledged once committed. It takes the commit-order lock and queues the wake-up first: no row leaves a join
# before both its sides have one, so the lock is held before the first row draws its id.
_INSERT_ORDERED = (
    "WITH ordered AS MATERIALIZED ("
    f"SELECT pg_advisory_xact_lock($2) AS locked, pg_notify('{STATUS_CHANNEL}', $3) AS notified)"
    + _INSERT_FROM
    + " CROSS JOIN ordered"
    + _INSERT_END
)
# Rows a history page with payloads reads from its cursor at a time (each payload up to --max-payload).
_PAYLOAD_PREFETCH = 8
_RESENT = "SELECT delivery_key, received_at FROM status WHERE delivery_key = ANY($1::bytea[]) AND received_at >= $2"
_SELECT = (
    "SELECT id, serial_number, ts, received_at, battery_level, battery_status, driving_status, "
    "current_drive_id::text, latitude, longitude, height, payload::text, payload_hash FROM status"
)
# Buckets aligned on the Unix epoch, like SQLite's; date_bin is exact (integer microseconds inside). Not before
# 0001-01-01T00:00:00Z, as on SQLite: the floor of a time in year 1 can be a date no datetime holds.
_BUCKET = (
    "greatest(date_bin($4::interval, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00'), TIMESTAMPTZ '0001-01-01 00:00:00+00')"
)
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


# Connections: the writer's batches plus concurrent reads (`spotbox bench --scenario reads` measures the reads).
POOL_SIZE = 8


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection released without asyncpg's reset query (a round trip per read, half a read's cost).

    spotbox leaves no session state on a pooled connection to reset: no LISTEN, no SET, no session advisory lock
    (the migration's lock is transaction-scoped), and every transaction is closed by its `async with`.
    """

    def get_reset_query(self) -> str:
        """Nothing to reset."""
        return ""


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
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=POOL_SIZE, timeout=10, connection_class=_Connection
            )
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
        """Insert the whole batch with one statement, in one transaction (resends already stored left out)."""
        resent = base.resent_keys(records)
        try:
            async with self._acquire() as conn:
                if not resent:
                    rows = await conn.fetch(_INSERT_ORDERED, _batch_json(records), COMMIT_ORDER_LOCK, self.writer_tag)
                else:
                    rows = await self._write_resent(conn, records, resent)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL write failed: {exc!r}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL write failed: {exc}") from exc
        # assign_ids, keyed by the datetime (asyncpg gives an aware UTC one) rather than its microseconds.
        returned = {(row[1], row[2], row[3]): row[0] for row in rows}
        return [returned.pop((record.serial_number, record.ts, record.payload_hash), None) for record in records]

    async def _write_resent(
        self, conn: Any, records: Sequence[StatusRecord], resent: list[bytes]
    ) -> list[asyncpg.Record]:
        """A batch with resends (DUP): those whose first delivery is stored already are left out, read under the
        commit-order lock so that another instance's commit of them is seen."""
        async with conn.transaction():
            # First: ids are drawn after every earlier insert of any instance committed (commit order).
            await conn.execute(_LOCK_AND_NOTIFY, COMMIT_ORDER_LOCK, self.writer_tag)
            stored = await conn.fetch(_RESENT, resent, base.resend_cutoff(records))
            records_to_write = base.without_resent(records, [(bytes(row[0]), row[1]) for row in stored])
            return await conn.fetch(_INSERT, _batch_json(records_to_write)) if records_to_write else []

    async def history(self, query: HistoryQuery) -> list[StoredStatus]:
        """Rows of one robot in (ts, id) order, after the cursor, within the time range, payloads included."""
        where, params = _history_where(query)
        sql = f"{_SELECT} WHERE {where} ORDER BY ts, id LIMIT ${len(params) + 1}"
        return [_stored(row) for row in await self._fetch(sql, [*params, query.limit])]

    async def history_page(self, query: HistoryQuery, include_payload: bool) -> HistoryPage:
        """One page as JSON; payloads read only when asked for, through a cursor, within the budget."""
        where, params = _history_where(query)
        limit = f"LIMIT ${len(params) + 1}"
        params.append(query.limit + 1)
        if not include_payload:
            page = await self._page_stored(where, limit, params, query.limit)
            if page is None:
                page = await self._page_text(where, limit, params, query.limit)
            if page is not None:
                return page
            rows = await self._fetch(f"{_API_SELECT} FROM status WHERE {where} ORDER BY ts, id {limit}", params)
            more = len(rows) > query.limit
            rows = rows[: query.limit]
        else:
            sql = f"{_API_SELECT}, payload::text FROM status WHERE {where} ORDER BY ts, id {limit}"
            rows, more = await self._within_budget(sql, params, query.limit)
        after = (rows[-1][2], rows[-1][0]) if more else None
        return HistoryPage(api_items_json(rows), len(rows), after)

    async def _page_stored(self, where: str, limit: str, params: list[Any], page: int) -> HistoryPage | None:
        """The page as the rows' stored JSON, read from the history index alone and joined here; None when a row
        has none (stored before schema step 9).

        One text per row costs PostgreSQL and this process less than string_agg over a numbered page (measured:
        about 240 and 170 us a page against 430 and 140).
        """
        rows = await self._fetch(
            f"SELECT '{{\"id\":' || id || ',' || api_rest FROM status WHERE {where} ORDER BY ts, id {limit}", params
        )
        return _joined_page([row[0] for row in rows], page)

    async def _page_text(self, where: str, limit: str, params: list[Any], page_limit: int) -> HistoryPage | None:
        """The page as JSON text written by PostgreSQL, the Python process only joining it; None when a value is
        one PostgreSQL would write otherwise than orjson (then the page is built from rows).

        The text is byte for byte the JSON built from rows (test): it moves the rows' decoding and encoding out of
        the event loop's thread, which serves every request. One text per row, joined here, costs PostgreSQL
        less than string_agg over a numbered page and this process about the same.
        """
        sql = (
            f"SELECT CASE WHEN {_FLOATS_AS_ORJSON} AND (SELECT current_setting('extra_float_digits')::int >= 1) "
            f"THEN {_ITEM_TEXT} END FROM status WHERE {where} ORDER BY ts, id {limit}"
        )
        rows = await self._fetch(sql, params)
        return _joined_page([row[0] for row in rows], page_limit)

    async def _within_budget(self, sql: str, params: Sequence[Any], limit: int) -> tuple[list[Any], bool]:
        rows: list[Any] = []
        held = 0
        try:
            async with self._acquire() as conn, conn.transaction():
                async for row in conn.cursor(sql, *params, prefetch=_PAYLOAD_PREFETCH):
                    held += len(row[-1])
                    if len(rows) == limit or (rows and held > PAGE_PAYLOAD_BUDGET):
                        return rows, True
                    rows.append(row)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL read failed: {exc!r}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL read failed: {exc}") from exc
        return rows, False

    async def robot_exists(self, serial_number: str) -> bool:
        """True once a row of this robot is stored."""
        return bool(await self._fetch("SELECT 1 FROM status WHERE serial_number = $1 LIMIT 1", [serial_number]))

    async def statuses_after(self, after_id: int, limit: int) -> list[StoredStatus]:
        """Rows after `after_id` in id order, payloads included (what store and forward sends)."""
        return [
            _stored(row)
            for row in await self._fetch(f"{_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", [after_id, limit])
        ]

    async def rows_after(self, serial_number: str | None, after_id: int, limit: int) -> list[StatusRow]:
        """Rows with id greater than `after_id` in id order, of one robot or (None) of every robot; no payloads."""
        if serial_number is None:
            sql = f"{_API_SELECT} FROM status WHERE id > $1 ORDER BY id LIMIT $2"
            rows = await self._fetch(sql, [after_id, limit])
        else:
            sql = f"{_API_SELECT} FROM status WHERE serial_number = $1 AND id > $2 ORDER BY id LIMIT $3"
            rows = await self._fetch(sql, [serial_number, after_id, limit])
        return [StatusRow(*row) for row in rows]

    async def latest(self, serial_number: str) -> StatusRow | None:
        """The robot's row with the greatest (ts, id); no payload."""
        rows = await self._fetch(base.latest_sql(f"{_API_SELECT} FROM status", "$"), [serial_number])
        return StatusRow(*rows[0]) if rows else None

    async def latest_per_robot(self) -> list[StatusRow]:
        """The latest row of every robot, by serial number; no payloads."""
        sql = base.latest_per_robot_sql(f"{_API_SELECT} FROM status", ' COLLATE "C"')
        return [StatusRow(*row) for row in await self._fetch(sql, [])]

    async def last_received(self, serial_number: str | None = None) -> dict[str, datetime]:
        """When the most recently stored status of each robot (or of one) was received."""
        if serial_number is None:
            rows = await self._fetch(base.LAST_RECEIVED_SQL, [])
        else:
            rows = await self._fetch(base.last_received_one_sql("$"), [serial_number])
        return {row[0]: row[1] for row in rows}

    async def time_range(self, serial_number: str) -> tuple[datetime, datetime] | None:
        """The first and last ts of the robot."""
        ((first, last),) = await self._fetch(base.time_range_sql("$"), [serial_number])
        return None if first is None else (first, last)

    async def downsample(self, query: DownsampleQuery) -> list[Bucket]:
        """Buckets computed by PostgreSQL with date_bin."""
        params = (query.serial_number, query.start.isoformat(), query.end.isoformat(), query.interval)
        rows = await self._fetch(base.downsample_sql(query.agg, "$", _BUCKET, _TIME_TEXT), params)
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

    def db_time(self, moment: datetime) -> datetime:
        """A datetime as this backend stores it: timestamptz takes it as it is."""
        return moment

    def from_db_time(self, value: Any) -> datetime:
        """A stored time back as an aware UTC datetime."""
        moment: datetime = value
        return moment

    async def execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Run write statements in one transaction; each one's row count."""
        counts: list[int] = []
        try:
            async with self._acquire() as conn, conn.transaction():
                for sql, params in statements:
                    status: str = await conn.execute(sql, *params)
                    tail = status.rsplit(" ", 1)[-1]
                    counts.append(int(tail) if tail.isdigit() else 0)
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL write failed: {exc!r}") from exc
        except asyncpg.IntegrityConstraintViolationError as exc:
            raise StorageConflictError(f"PostgreSQL write failed: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(f"PostgreSQL write failed: {exc}") from exc
        return counts

    async def query(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        """Rows of a read statement."""
        return list(await self._fetch(sql, params))

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


# A time a user gave (a range, a cursor) travels as text cast here: asyncpg sends datetime.min and datetime.max as
# -infinity and infinity, and a cursor at 0001-01-01T00:00:00Z (a robot clock never set) gave the same page for
# ever, a range ending there nothing.
_TIME_TEXT = "::text::timestamptz"


def _history_where(query: HistoryQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of one robot's rows in the query's range after its cursor, and its parameters."""
    clauses = ["serial_number = $1"]
    params: list[Any] = [query.serial_number]
    if query.start is not None:
        params.append(query.start.isoformat())
        clauses.append(f"ts >= ${len(params)}{_TIME_TEXT}")
    if query.end is not None:
        params.append(query.end.isoformat())
        clauses.append(f"ts <= ${len(params)}{_TIME_TEXT}")
    if query.after is not None:
        ts, row_id = query.after
        params.extend((ts.isoformat(), row_id))
        clauses.append(f"(ts, id) > (${len(params) - 1}{_TIME_TEXT}, ${len(params)})")
    return " AND ".join(clauses), params


def _joined_page(items: list[str | None], page: int) -> HistoryPage | None:
    """A history page from each row's JSON text (one row more than the page, when another follows); None when a
    row of the page has none."""
    texts = [item for item in items[:page] if item is not None]
    if len(texts) < len(items[:page]):
        return None
    after = None
    if len(items) > page:
        last = orjson.loads(texts[-1])
        after = (parse_utc(last["ts"].removesuffix("Z")), last["id"])
    return HistoryPage(f"[{','.join(texts)}]".encode(), len(texts), after)


def _batch_json(records: Sequence[StatusRecord]) -> str:
    """The rows of `_INSERT`'s parameter, as one JSON array; times in UTC, written as the API writes them."""
    fragment = orjson.Fragment
    return dumps(
        [
            (
                record.serial_number,
                _utc(record.ts),
                _utc(record.received_at),
                record.battery_level,
                record.battery_status,
                record.driving_status,
                record.current_drive_id,
                repr(record.latitude),
                repr(record.longitude),
                repr(record.height),
                fragment(record.payload),
                record.payload_hash.hex(),
                None if record.delivery_key is None else record.delivery_key.hex(),
                location_json(record.latitude, record.longitude, record.height),
            )
            for record in records
        ]
    ).decode()


def _utc(moment: datetime) -> datetime:
    """`moment` in UTC: records are (parse_utc, datetime.now(UTC)), this keeps `api_rest` right if one is not."""
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)
