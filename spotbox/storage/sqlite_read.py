"""SQLite reads: a small pool of threads, each with its own connection, and the read queries that run in them.

A read is one hop to a thread and back: the query runs there (SQLite releases the GIL while it steps), and so does
the turning of rows into what the caller wants, JSON included, so the event loop only waits on one future.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from spotbox.errors import StorageUnavailableError
from spotbox.status import API_COLUMN_COUNT, StatusRow, api_items_json, from_micros, parse_utc, to_micros
from spotbox.storage.base import HistoryPage, HistoryQuery

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Threads (and connections) reading at once: two let one thread's query step in SQLite (without the GIL) while
# the other turns its rows into JSON; on two cores more would mostly wait for the GIL.
READERS = 2


def _iso(column: str) -> str:
    """SQL for integer microseconds as the text orjson writes for a UTC datetime: seconds, `.ffffff` unless 0, Z.

    Floor division, so that times before 1970 come out right as well. datetime() and substr() cost less than
    strftime() and printf() (about a third less for a page's 200 times). Part of a released migration step (the
    generated column API_ITEM): never change what it writes.
    """
    micros = f"(({column} % 1000000) + 1000000) % 1000000"
    return (
        f"replace(datetime(({column} - {micros}) / 1000000, 'unixepoch'), ' ', 'T') "
        f"|| CASE {micros} WHEN 0 THEN 'Z' ELSE '.' || substr({micros} + 1000000, 2) || 'Z' END"
    )


# A status's API object as JSON text, which SQLite computes when the row is written and keeps in the history
# index only (a VIRTUAL generated column: not in the table). A history page is then these texts joined, read from
# the index, instead of about 250 µs of SQLite's formatting a page. The location object is the `location_json`
# text orjson wrote at insert (its floats exactly as orjson writes them, which SQLite's printf cannot promise);
# rows stored before it existed have none, so no `api_item`, and their pages are built from rows. Part of a
# released migration step: never edit.
API_ITEM = (
    "CASE WHEN location_json IS NOT NULL THEN printf('"
    '{"id":%d,"serial_number":%s,"ts":"%s","received_at":"%s","battery_level":%d,"battery_status":%s,'
    '"driving_status":%s,"current_drive_id":%s,"location":%s}'
    f"', id, json_quote(serial_number), {_iso('ts')}, {_iso('received_at')}, battery_level, "
    "json_quote(battery_status), json_quote(driving_status), json_quote(current_drive_id), location_json) END"
)

# StatusRow's columns with the two times already as text: the history page costs no Python per time.
_API_TEXT = (
    f"SELECT id, serial_number, {_iso('ts')}, {_iso('received_at')}, battery_level, battery_status, driving_status, "
    "current_drive_id, latitude, longitude, height"
)
# StatusRow's columns, times as integers (turned into datetimes in Python).
API_SELECT = (
    "SELECT id, serial_number, ts, received_at, battery_level, battery_status, driving_status, current_drive_id, "
    "latitude, longitude, height FROM status"
)


def status_row(row: Sequence[Any]) -> StatusRow:
    """A StatusRow from a row of API_SELECT."""
    return StatusRow(
        row[0],
        row[1],
        from_micros(row[2]),
        from_micros(row[3]),
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
    )


class ReadPool:
    """Reader threads, each with its own connection to the database file (WAL: readers never block the writer)."""

    def __init__(self, path: Path, size: int = READERS) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(size, thread_name_prefix="spotbox-sqlite-read")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread off only so that close() can close it from the loop's thread, once idle.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _call(self, work: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return work(self._connection(), *args)
        except sqlite3.Error as exc:
            raise StorageUnavailableError(f"SQLite read failed: {exc}") from exc

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(connection, *args)` in a reader thread."""
        if self._executor is None:
            raise StorageUnavailableError(f"SQLite database {self.path} is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._call, work, args))

    async def fetch(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Every row of one query."""
        return await self.run(_fetchall, sql, params)

    async def close(self) -> None:
        """Wait for the reads in progress, then close every connection; safe to call twice."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(executor.shutdown, wait=True))
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


def _fetchall(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def history_where(query: HistoryQuery) -> tuple[str, list[Any]]:
    """The WHERE clause of one robot's rows in the query's range after its cursor, and its parameters."""
    clauses = ["serial_number = ?"]
    params: list[Any] = [query.serial_number]
    if query.start is not None:
        clauses.append("ts >= ?")
        params.append(to_micros(query.start))
    if query.end is not None:
        clauses.append("ts <= ?")
        params.append(to_micros(query.end))
    if query.after is not None:
        clauses.append("(ts, id) > (?, ?)")
        params.extend((to_micros(query.after[0]), query.after[1]))
    return " AND ".join(clauses), params


def history_sql(query: HistoryQuery, include_payload: bool) -> tuple[str, list[Any]]:
    """The history page query (one row more than the page, to tell whether another follows) and its parameters."""
    where, params = history_where(query)
    payload = ", payload" if include_payload else ""
    return f"{_API_TEXT}{payload} FROM status WHERE {where} ORDER BY ts, id LIMIT ?", [*params, query.limit + 1]


def history_text_sql(query: HistoryQuery) -> tuple[str, list[Any]]:
    """The history page as one JSON array text and what checks it, in one step of one statement.

    Each row's JSON is the `api_item` SQLite wrote with the row, read from the history index. One step: the thread
    holds the GIL once for the page instead of once per row, and builds no row objects. The subquery reads one row
    more than the page (to tell whether another follows) and numbers the rows in (ts, id) order; the outer query
    joins the page's items and their numbers, in the order it joins them: SQLite does not promise that
    group_concat keeps the subquery's order (it does today; group_concat(... ORDER BY ...) needs SQLite 3.44, and
    Python may link an older one: 3.40 on Debian bookworm), so the numbers, 1 to n when it did, show it. Columns:
    the items, their numbers, the rows read, the rows without an `api_item`, and the last item's ts and id.
    """
    where, params = history_where(query)
    page = query.limit
    rows = (
        f"SELECT api_item AS item, ts, id, row_number() OVER (ORDER BY ts, id) AS n FROM status WHERE {where} "
        "ORDER BY ts, id LIMIT ?"
    )
    sql = (
        f"SELECT group_concat(CASE WHEN n <= {page} THEN item END, ','), group_concat(n), count(*), "
        f"count(*) - count(item), max(CASE WHEN n = {page} THEN ts END), max(CASE WHEN n = {page} THEN id END) "
        f"FROM ({rows})"
    )
    return sql, [*params, page + 1]


def history_page_text(
    conn: sqlite3.Connection, text_sql: str, text_params: Sequence[Any], sql: str, params: Sequence[Any], limit: int
) -> HistoryPage:
    """Run `history_text_sql`; when a row has no `api_item`, or SQLite joined the items out of (ts, id) order,
    `history_page` (from rows) instead. The text is byte for byte what `api_items_json` writes (test)."""
    items, numbers, count, missing, last_ts, last_id = conn.execute(text_sql, text_params).fetchone()
    if not count:
        return HistoryPage(b"[]", 0, None)
    if missing or numbers != _numbers(count):
        if not missing:
            logger.debug("SQLite joined a history page out of (ts, id) order: built from rows instead")
        return history_page(conn, sql, params, limit, None)
    after = (from_micros(last_ts), last_id) if count > limit else None
    return HistoryPage(f"[{items}]".encode(), min(count, limit), after)


@functools.lru_cache(maxsize=64)
def _numbers(count: int) -> str:
    """1 to count as group_concat writes them."""
    return ",".join(map(str, range(1, count + 1)))


def history_page(
    conn: sqlite3.Connection, sql: str, params: Sequence[Any], limit: int, payload_budget: int | None
) -> HistoryPage:
    """Run `history_sql` and build the page's JSON; with payloads, stop reading once they pass `payload_budget`."""
    cursor = conn.execute(sql, params)
    if payload_budget is None:
        rows = cursor.fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
    else:
        rows, more = _within_budget(cursor, limit, payload_budget)
    cursor.close()
    after = None
    if more:
        last = rows[-1]
        after = (parse_utc(last[2].removesuffix("Z")), last[0])
    return HistoryPage(api_items_json(rows), len(rows), after)


def _within_budget(cursor: sqlite3.Cursor, limit: int, budget: int) -> tuple[list[Any], bool]:
    """Rows read one by one until `limit`, or until their payloads pass `budget` bytes (at least one row)."""
    rows: list[Any] = []
    held = 0
    for row in cursor:
        held += len(row[API_COLUMN_COUNT])
        if len(rows) == limit or (rows and held > budget):
            return rows, True
        rows.append(row)
    return rows, False
