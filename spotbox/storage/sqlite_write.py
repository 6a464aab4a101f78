"""SQLite writes: one thread holding the one writer connection, and the transactions that run in it.

Each write (a batch of statuses, a retention DELETE, the operations tables' statements, the migration) is one call
into that thread, whole: BEGIN, the statements and COMMIT or ROLLBACK happen there, so the event loop waits on one
future per write. SQLite releases the GIL while it prepares and steps; every time the thread takes the GIL back
while the event loop's thread is busy is a hand-over both pay for, so a write takes it back as seldom as it can
(aiosqlite, used before, made a hop per statement and per 64 rows read back: six or more a batch).

One thread runs one write at a time, in the order they were asked for: a statement of one write never lands in
another's transaction. A write whose caller was cancelled still runs to its end (commit or rollback) in the thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from spotbox.errors import StorageUnavailableError
from spotbox.status import StatusRecord, from_micros, location_json, to_micros
from spotbox.storage import base
from spotbox.storage.base import WRITE_COLUMNS, assign_ids

logger = logging.getLogger(__name__)

T = TypeVar("T")

# What an INSERT writes: the columns of both backends, and the location object's JSON that the history index's
# `api_item` uses (see sqlite_read.API_ITEM).
_INSERT_COLUMNS = (*WRITE_COLUMNS, "location_json")
# 32766 bound variables per statement since SQLite 3.32; stay well below.
ROWS_PER_INSERT = 32000 // len(_INSERT_COLUMNS)
_ROW_MARKS = "(" + ", ".join("?" * len(_INSERT_COLUMNS)) + ")"
# The rows one INSERT added, read back by id when the dedup index skipped some of the batch.
_READ_BACK = "SELECT id, serial_number, ts, payload_hash FROM status WHERE id > ?"


class WriterThread:
    """The writer connection, used only from its own thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="spotbox-sqlite-write")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Connect (in the thread); raises sqlite3.Error."""
        await self.run(lambda _conn: None)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in the writer thread; its exception, if any, is raised here."""
        if self._executor is None:
            raise StorageUnavailableError(f"SQLite database {self.path} is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, work, args))

    def _call(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout = 5000")
        return work(self._conn, *args)

    async def close(self) -> None:
        """Let the writes already asked for finish, then close the connection; safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(executor, self._close)
        await loop.run_in_executor(None, functools.partial(executor.shutdown, wait=True))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def transaction(conn: sqlite3.Connection, work: Callable[..., T], *args: Any) -> T:
    """`work(conn, *args)` between BEGIN IMMEDIATE and COMMIT, rolled back when anything in it fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn, *args)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return result


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back after a failed statement, keeping the failure the caller re-raises as the one reported.

    On a full disk or an I/O error SQLite has often rolled back by itself, and ROLLBACK then fails with "no
    transaction is active": that must not hide "database or disk is full".
    """
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            logger.error("rollback failed, the connection is still in a transaction: %s", exc)
        else:
            logger.debug("rollback not needed, SQLite already rolled back: %s", exc)


def write_batch(conn: sqlite3.Connection, records: Sequence[StatusRecord]) -> list[int | None]:
    """Insert a batch, committed when this returns; each record's row id, None for a duplicate (dedup index)."""
    if not records:
        return []
    if len(records) <= ROWS_PER_INSERT and not base.resent_keys(records):
        return _insert_alone(conn, records)
    return assign_ids(records, transaction(conn, _insert_all, records))


def _insert_alone(conn: sqlite3.Connection, records: Sequence[StatusRecord]) -> list[int | None]:
    """The usual batch (no resends, one statement's worth): one INSERT, its own transaction.

    SQLite gives a new row the greatest id plus one, so the k rows it inserted are the k ids up to the last one,
    in statement order: when all were inserted those are the ids, without RETURNING; otherwise the new rows are
    read back by id (this thread is the only writer).
    """
    cursor = conn.execute(_insert_sql(len(records)), _params(records))
    inserted, last = cursor.rowcount, cursor.lastrowid or 0
    cursor.close()
    if inserted <= 0:
        return [None] * len(records)
    if inserted == len(records):
        return list(range(last - inserted + 1, last + 1))
    fresh = conn.execute(_READ_BACK, (last - inserted,)).fetchall()
    return assign_ids(records, {(row[1], row[2], row[3]): row[0] for row in fresh})


def _insert_all(conn: sqlite3.Connection, records: Sequence[StatusRecord]) -> dict[tuple[str, int, bytes], int]:
    """Insert in a transaction, leaving out resends already stored; the new rows' ids by dedup key."""
    records = _without_resent(conn, records)
    returned: dict[tuple[str, int, bytes], int] = {}
    for start in range(0, len(records), ROWS_PER_INSERT):
        chunk = records[start : start + ROWS_PER_INSERT]
        sql = _insert_sql(len(chunk)) + " RETURNING id, serial_number, ts, payload_hash"
        for row in conn.execute(sql, _params(chunk)):
            returned[(row[1], row[2], row[3])] = row[0]
    return returned


def _without_resent(conn: sqlite3.Connection, records: Sequence[StatusRecord]) -> Sequence[StatusRecord]:
    """`records` without the resends (DUP) whose first delivery is a recent row already."""
    keys = base.resent_keys(records)
    if not keys:
        return records
    stored: list[tuple[bytes, datetime]] = []
    cutoff = to_micros(base.resend_cutoff(records))
    for start in range(0, len(keys), ROWS_PER_INSERT):
        chunk = keys[start : start + ROWS_PER_INSERT]
        marks = ", ".join("?" * len(chunk))
        sql = f"SELECT delivery_key, received_at FROM status WHERE delivery_key IN ({marks}) AND received_at >= ?"
        stored.extend((row[0], from_micros(row[1])) for row in conn.execute(sql, [*chunk, cutoff]))
    return base.without_resent(records, stored)


def _insert_sql(rows: int) -> str:
    """INSERT of `rows` rows that skips a status already stored (the dedup index)."""
    marks = ", ".join([_ROW_MARKS] * rows)
    return f"INSERT INTO status ({', '.join(_INSERT_COLUMNS)}) VALUES {marks} ON CONFLICT DO NOTHING"


def _params(records: Sequence[StatusRecord]) -> list[Any]:
    return [value for record in records for value in _row_values(record)]


def _row_values(record: StatusRecord) -> tuple[Any, ...]:
    return (
        record.serial_number,
        to_micros(record.ts),
        to_micros(record.received_at),
        record.battery_level,
        record.battery_status,
        record.driving_status,
        record.current_drive_id,
        record.latitude,
        record.longitude,
        record.height,
        record.payload.decode(),
        record.payload_hash,
        record.delivery_key,
        # SQLite stores -0.0 as 0 (a whole REAL is kept as an integer) and reads back 0.0: adding 0.0 turns -0.0
        # into 0.0 and leaves every other float as it is, so the JSON is what the row reads back as.
        location_json(record.latitude + 0.0, record.longitude + 0.0, record.height + 0.0),
    )
