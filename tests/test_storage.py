"""Both storage backends, for real: the same behaviour on a SQLite file and on PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from spotbox.errors import StorageUnavailableError
from spotbox.settings import BUNDLED_SCHEMA, DatabaseURL
from spotbox.status import RESEND_WINDOW, Delivery, StatusRecord, dumps
from spotbox.storage import HistoryQuery, Storage, open_storage, sqlite_write
from spotbox.storage import postgres as postgres_backend
from spotbox.storage import sqlite as sqlite_backend
from spotbox.storage.base import COLUMNS
from spotbox.storage.sqlite import SQLiteStorage
from spotbox.validation import StatusValidator
from tests.conftest import fresh_postgres_database
from tests.helpers import payload

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
VALIDATOR = StatusValidator(BUNDLED_SCHEMA)


def record_at(serial: str, ts: datetime, **changes: object) -> StatusRecord:
    """A validated record of `serial` with timestamp `ts`, received one second later."""
    verdict = VALIDATOR.check(serial, payload(timestamp=ts.isoformat(), **changes), ts + timedelta(seconds=1))
    assert isinstance(verdict, StatusRecord)
    return verdict


def record(serial: str, minute: int, **changes: object) -> StatusRecord:
    """A validated record of `serial` at T0 + `minute` minutes."""
    return record_at(serial, T0 + timedelta(minutes=minute), **changes)


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    """An opened storage on the parametrized database."""
    store = open_storage(DatabaseURL.parse(database_url))
    await store.open()
    yield store
    await store.close()


async def test_batch_returns_ids_and_round_trips_every_field(storage: Storage) -> None:
    """Test that a written batch reads back field for field, with increasing row ids."""
    written = [record("R1", 1), record("R1", 2, driving_status="IDLE", current_drive_id=None, firmware="x")]
    ids = await storage.write_batch(written)
    assert all(isinstance(row_id, int) for row_id in ids)
    assert ids[0] is not None
    assert ids[1] is not None
    assert ids[0] < ids[1]
    rows = await storage.history(HistoryQuery("R1"))
    assert [row.id for row in rows] == ids
    for row, original in zip(rows, written, strict=True):
        got = row.record
        assert got.serial_number == original.serial_number
        assert got.ts == original.ts
        assert got.received_at == original.received_at
        assert got.battery_level == original.battery_level
        assert got.battery_status == original.battery_status
        assert got.driving_status == original.driving_status
        assert got.current_drive_id == original.current_drive_id
        assert (got.latitude, got.longitude, got.height) == (original.latitude, original.longitude, original.height)
        assert got.payload_hash == original.payload_hash
    assert b'"firmware"' in rows[1].record.payload


async def test_redelivered_status_is_stored_once(storage: Storage) -> None:
    """Test that the same robot, ts and payload is stored once, within a batch and across batches."""
    first = record("R1", 1)
    ids = await storage.write_batch([first, first, record("R1", 2)])
    assert ids[0] is not None
    assert ids[1] is None
    assert ids[2] is not None
    assert await storage.write_batch([first]) == [None]
    # Same ts, different payload: a different status, stored.
    other = await storage.write_batch([record("R1", 1, battery_level=42)])
    assert other[0] is not None
    assert len(await storage.history(HistoryQuery("R1"))) == 3


async def test_history_orders_by_ts_and_filters_range_and_cursor(storage: Storage) -> None:
    """Test time order regardless of arrival, the inclusive time range, and keyset paging."""
    await storage.write_batch([record("R1", minute) for minute in (5, 1, 3, 2, 4)])
    await storage.write_batch([record("R2", 1)])
    rows = await storage.history(HistoryQuery("R1"))
    assert [row.record.ts for row in rows] == [T0 + timedelta(minutes=m) for m in (1, 2, 3, 4, 5)]
    ranged = await storage.history(HistoryQuery("R1", start=T0 + timedelta(minutes=2), end=T0 + timedelta(minutes=4)))
    assert [row.record.ts.minute for row in ranged] == [2, 3, 4]
    page = await storage.history(HistoryQuery("R1", limit=2))
    rest = await storage.history(HistoryQuery("R1", after=(page[-1].record.ts, page[-1].id)))
    assert [row.id for row in page + rest] == [row.id for row in rows]


async def test_robot_exists(storage: Storage) -> None:
    """Test that a robot exists once one of its statuses is stored."""
    assert not await storage.robot_exists("R1")
    await storage.write_batch([record("R1", 1)])
    assert await storage.robot_exists("R1")
    assert not await storage.robot_exists("R2")


async def test_reopening_keeps_rows_and_does_not_migrate_again(own_database_url: str) -> None:
    """Test that the schema is created once and versioned: a second start finds the data as it was."""
    first = open_storage(DatabaseURL.parse(own_database_url))
    await first.open()
    await first.write_batch([record("R1", 1)])
    await first.close()
    second = open_storage(DatabaseURL.parse(own_database_url))
    await second.open()
    try:
        assert len(await second.history(HistoryQuery("R1"))) == 1
    finally:
        await second.close()


async def test_latest_is_the_greatest_ts_then_id(storage: Storage) -> None:
    """Test that a robot's latest row is the one with the greatest ts (ties: greatest id), not the last written."""
    assert await storage.latest("R1") is None
    await storage.write_batch([record("R1", 5), record("R1", 1)])
    await storage.write_batch([record("R1", 3)])
    latest = await storage.latest("R1")
    assert latest is not None
    assert latest.ts == T0 + timedelta(minutes=5)
    # Same ts, another payload: both stored, the later row wins the tie.
    [tie_id] = await storage.write_batch([record("R1", 5, battery_level=9)])
    latest = await storage.latest("R1")
    assert latest is not None
    assert (latest.id, latest.battery_level) == (tie_id, 9)


async def test_latest_per_robot_is_one_row_per_robot_in_serial_order(storage: Storage) -> None:
    """Test that the fleet listing has each robot once, with its own latest row, in byte order of serials."""
    assert await storage.latest_per_robot() == []
    serials = ["b-2", "B-1", "a", "A.9", "10", "9"]
    for n, serial in enumerate(serials):
        await storage.write_batch([record(serial, minute, battery_level=n + minute) for minute in (3, 9, 1)])
    rows = await storage.latest_per_robot()
    assert [row.serial_number for row in rows] == sorted(serials)
    for row in rows:
        n = serials.index(row.serial_number)
        assert (row.ts, row.battery_level) == (T0 + timedelta(minutes=9), n + 9)
        latest = await storage.latest(row.serial_number)
        assert latest is not None
        assert row.id == latest.id


async def test_time_range_is_first_and_last_ts(storage: Storage) -> None:
    """Test that a robot's time range spans its first and last ts, and is None for a robot never seen."""
    await storage.write_batch([record("R1", minute) for minute in (4, 2, 8)] + [record("R2", 30)])
    assert await storage.time_range("R1") == (T0 + timedelta(minutes=2), T0 + timedelta(minutes=8))
    assert await storage.time_range("R3") is None


async def test_delete_before_is_bounded_and_spares_newer_rows(storage: Storage) -> None:
    """Test that delete_before removes at most `limit` rows per call, only rows before the cutoff, of every robot."""
    await storage.write_batch([record(serial, minute) for serial in ("R1", "R2") for minute in range(10)])
    cutoff = T0 + timedelta(minutes=6)  # minutes 0 to 5 of both robots: 12 rows
    assert await storage.delete_before(cutoff, 5) == 5
    assert await storage.delete_before(cutoff, 5) == 5
    assert await storage.delete_before(cutoff, 5) == 2
    assert await storage.delete_before(cutoff, 5) == 0
    for serial in ("R1", "R2"):
        rows = await storage.history(HistoryQuery(serial))
        assert [row.record.ts for row in rows] == [T0 + timedelta(minutes=m) for m in range(6, 10)]


async def test_row_ids_are_never_reused_after_retention(storage: Storage) -> None:
    """Test that after retention deleted every old row, a new row still gets an id above all ids handed out:
    a feed resuming from its Last-Event-ID would otherwise skip it."""
    old = await storage.write_batch([record("R1", minute) for minute in range(5)])
    await storage.delete_before(T0 + timedelta(days=1), 100)
    (new,) = await storage.write_batch([record("R1", 60 * 24 * 2)])
    assert new is not None
    assert new > max(row_id for row_id in old if row_id is not None)


@pytest.mark.postgres
async def test_fleet_order_is_byte_order_whatever_the_postgres_locale() -> None:
    """Test that a PostgreSQL database with a linguistic (ICU en-US) collation lists robots in SQLite's order."""
    icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    async with fresh_postgres_database(icu) as url:
        store = open_storage(DatabaseURL.parse(url))
        await store.open()
        try:
            serials = ["b-2", "B-1", "a", "A.9"]
            await store.write_batch([record(serial, 1) for serial in serials])
            rows = await store.latest_per_robot()
        finally:
            await store.close()
    # en-US would give a, A.9, B-1, b-2.
    assert [row.serial_number for row in rows] == ["A.9", "B-1", "a", "b-2"]


async def test_delete_before_keeps_rows_after_a_forward_cursor(storage: Storage) -> None:
    """Test that rows past `keep_after_id` (not yet forwarded upstream) survive retention, older ones go."""
    ids = await storage.write_batch([record("R1", minute) for minute in range(10)])
    keep_after = ids[3]
    assert keep_after is not None
    assert await storage.delete_before(T0 + timedelta(days=1), 100, keep_after_id=keep_after) == 4
    left = [row.id for row in await storage.history(HistoryQuery("R1"))]
    assert left == ids[4:]


async def test_forward_cursors_are_kept_per_target(storage: Storage) -> None:
    """Test that a forward cursor starts at 0, is saved per target and overwritten, and counts the rows after it."""
    ids = await storage.write_batch([record("R1", minute) for minute in range(5)])
    assert await storage.forward_cursor("mqtt://a:1883") == 0
    await storage.save_forward_cursor("mqtt://a:1883", ids[1] or 0)
    await storage.save_forward_cursor("mqtt://b:1883", ids[4] or 0)
    await storage.save_forward_cursor("mqtt://a:1883", ids[2] or 0)
    assert await storage.forward_cursor("mqtt://a:1883") == ids[2]
    assert await storage.forward_cursor("mqtt://b:1883") == ids[4]
    assert await storage.count_after(ids[2] or 0) == 2


async def test_full_disk_is_reported_as_such_and_writes_resume(tmp_path: Path) -> None:
    """Test that a write on a full disk fails naming the cause (not "cannot rollback"), for a usual batch (one
    INSERT, its own commit) and for one with a resend (an explicit transaction), and the next write works."""
    store = SQLiteStorage(tmp_path / "full.db")
    await store.open()
    try:
        # The fault: SQLite's own size limit on the writer connection. The file may not grow: the next batch hits
        # SQLITE_FULL, and SQLite rolls the statement (or the transaction) back itself.
        [[pages]] = await store.query("PRAGMA page_count", [])
        await store.execute([(f"PRAGMA max_page_count = {pages}", [])])
        with pytest.raises(StorageUnavailableError, match="database or disk is full"):
            await store.write_batch([record("R1", 1, firmware="x" * 200_000)])
        with pytest.raises(StorageUnavailableError, match="database or disk is full"):
            await store.write_batch([_delivered(0, resend=True, firmware="x" * 200_000)])
        await store.execute([("PRAGMA max_page_count = 1073741823", [])])
        [row_id] = await store.write_batch([record("R1", 2)])
        assert row_id is not None
        assert [row.id for row in await store.history(HistoryQuery("R1"))] == [row_id]
    finally:
        await store.close()


def _delivered(
    minute: int, *, resend: bool, client: str = "c1", received: timedelta = timedelta(0), **changes: object
) -> StatusRecord:
    """An unstamped status of R1 received at T0 + minute + `received`, delivered by `client` with packet id 7."""
    at = T0 + timedelta(minutes=minute) + received
    verdict = VALIDATOR.check("R1", payload(timestamp=..., **changes), at)
    assert isinstance(verdict, StatusRecord)
    key = Delivery(client, 7, resend).key(verdict.payload_hash)
    return dataclasses.replace(verdict, delivery_key=key, resend=resend)


async def test_resent_delivery_is_stored_once_within_the_window(storage: Storage) -> None:
    """Test that a resend (DUP) of a stored delivery is a duplicate within RESEND_WINDOW, a new row past it, and
    that an equal payload without DUP or from another client is always a new row."""
    [first] = await storage.write_batch([_delivered(0, resend=False)])
    assert first is not None
    assert await storage.write_batch([_delivered(1, resend=True)]) == [None]
    batch = [
        _delivered(2, resend=False),
        _delivered(3, resend=True, client="c2"),
        _delivered(0, resend=True, received=RESEND_WINDOW + timedelta(seconds=1)),
    ]
    assert all(row_id is not None for row_id in await storage.write_batch(batch))
    assert len(await storage.history(HistoryQuery("R1"))) == 4


async def test_older_schema_is_migrated_keeping_rows(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a database of the schema before delivery keys is migrated at open, its rows kept and readable,
    in history pages as well."""
    module: Any = sqlite_backend if database_url.startswith("sqlite") else postgres_backend
    migrations = module.MIGRATIONS
    monkeypatch.setattr(module, "MIGRATIONS", migrations[:2])
    old = open_storage(DatabaseURL.parse(database_url))
    await old.open()
    await old.close()
    # A row of the release before, written without a delivery key.
    row = record("R1", 0)
    columns = ", ".join(COLUMNS)
    if module is sqlite_backend:
        values = sqlite_write._row_values(row)[: len(COLUMNS)]  # the old release's row
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db, db:
            db.execute(f"INSERT INTO status ({columns}) VALUES ({', '.join('?' * len(COLUMNS))})", values)
    else:
        values = (  # the old release's row
            *(getattr(row, column) for column in COLUMNS[:10]),
            row.payload.decode(),
            row.payload_hash,
        )
        conn = await asyncpg.connect(database_url)
        try:
            marks = ", ".join(f"${n + 1}" for n in range(len(COLUMNS)))
            await conn.execute(f"INSERT INTO status ({columns}) VALUES ({marks.replace('$11', '$11::jsonb')})", *values)
        finally:
            await conn.close()
    monkeypatch.setattr(module, "MIGRATIONS", migrations)
    new = open_storage(DatabaseURL.parse(database_url))
    await new.open()
    try:
        [row_id] = await new.write_batch([_delivered(1, resend=False)])
        assert await new.write_batch([_delivered(2, resend=True)]) == [None]
        rows = await new.history(HistoryQuery("R1"))
        assert [stored.record.ts for stored in rows] == [row.ts, T0 + timedelta(minutes=1)]
        assert rows[1].id == row_id
        # A history page with the old row (on SQLite without the JSON the index keeps of newer rows) and a new one.
        page = await new.history_page(HistoryQuery("R1"), include_payload=False)
        assert (page.items_json, page.count) == (dumps([stored.to_api() for stored in rows]), 2)
    finally:
        await new.close()


# Run in a fresh interpreter: SQLite's memory statistics are set once per process, before its first connection.
_MEMORY_STATISTICS = """
import asyncio, sqlite3, sys
from pathlib import Path
from spotbox.storage.sqlite import SQLiteStorage
from spotbox.storage.sqlite_library import _library, memory_held

async def main(folder):
    earlier = sqlite3.connect(":memory:") if sys.argv[2] == "open" else None
    store = SQLiteStorage(Path(folder) / "s.db")
    await store.open()
    held = memory_held(_library())
    await store.close()
    if earlier is not None:
        assert earlier.execute("SELECT 41 + 1").fetchone() == (42,)
    print(held)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize(("before", "counted"), [("nothing", False), ("open", True)])
def test_sqlite_memory_statistics_off_only_when_nothing_is_open(tmp_path: Path, before: str, counted: bool) -> None:
    """Test that opening SQLite storage turns SQLite's memory statistics (a process-wide mutex on every allocation,
    which made two reader threads each take 2.3 times the CPU of one) off, but leaves them on, and leaves SQLite
    running, when a connection of the process is already open."""
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_STATISTICS, str(tmp_path), before],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (int(result.stdout) > 0) is counted
