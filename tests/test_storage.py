"""Both storage backends, for real: the same behaviour on a SQLite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from spotbox.settings import BUNDLED_SCHEMA, DatabaseURL
from spotbox.status import StatusRecord
from spotbox.storage import HistoryQuery, Storage, open_storage
from spotbox.validation import StatusValidator
from tests.helpers import payload

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
VALIDATOR = StatusValidator(BUNDLED_SCHEMA)


def record(serial: str, minute: int, **changes: object) -> StatusRecord:
    """A validated record of `serial` at T0 + `minute` minutes."""
    ts = (T0 + timedelta(minutes=minute)).isoformat()
    verdict = VALIDATOR.check(serial, payload(timestamp=ts, **changes), T0 + timedelta(minutes=minute, seconds=1))
    assert isinstance(verdict, StatusRecord)
    return verdict


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


async def test_reopening_keeps_rows_and_does_not_migrate_again(database_url: str) -> None:
    """Test that the schema is created once and versioned: a second start finds the data as it was."""
    first = open_storage(DatabaseURL.parse(database_url))
    await first.open()
    await first.write_batch([record("R1", 1)])
    await first.close()
    second = open_storage(DatabaseURL.parse(database_url))
    await second.open()
    try:
        assert len(await second.history(HistoryQuery("R1"))) == 1
    finally:
        await second.close()
