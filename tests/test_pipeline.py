"""The writer: a status the database refuses fails alone, at a bounded cost to the rest of its batch."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from spotbox.errors import StorageError
from spotbox.pipeline import IngestPipeline
from spotbox.status import StatusRecord, StoredStatus
from spotbox.storage import HistoryQuery
from spotbox.storage.sqlite import SQLiteStorage
from tests.test_storage import T0, VALIDATOR, record_at

BATCH = 64


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    """A real SQLite storage."""
    store = SQLiteStorage(tmp_path / "spotbox.db")
    await store.open()
    yield store
    await store.close()


async def test_a_refused_row_costs_log_n_transactions(storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a batch the database refuses for one row is split in halves: that row fails alone, in about
    2 log2(n) transactions, and every other row of the batch is committed and fanned out."""
    calls: list[int] = []
    real = storage.write_batch

    async def write_batch(records: Sequence[StatusRecord]) -> list[int | None]:
        # The fault at the I/O seam: the database refuses any transaction holding the POISON row.
        calls.append(len(records))
        if any(record.serial_number == "POISON" for record in records):
            raise StorageError("injected: the database refuses this row")
        return await real(records)

    monkeypatch.setattr(storage, "write_batch", write_batch)
    fanned_out: list[StoredStatus] = []
    pipeline = IngestPipeline(storage, VALIDATOR, fanned_out.extend, queue_size=1000, batch_max=BATCH, batch_wait_s=0.5)
    writer = asyncio.create_task(pipeline.run())
    serials = ["R1"] * (BATCH // 2) + ["POISON"] + ["R1"] * (BATCH // 2 - 1)
    records = [record_at(serial, T0 + timedelta(seconds=n)) for n, serial in enumerate(serials)]
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(pipeline.commit(record) for record in records), return_exceptions=True)
        await pipeline.stop()
        await writer
    assert calls[0] == BATCH, "the statuses were not written as one batch"
    assert len(calls) <= 2 * math.ceil(math.log2(BATCH)) + 1, calls
    [refused] = [result for result in results if isinstance(result, BaseException)]
    assert isinstance(refused, StorageError)
    assert isinstance(results[BATCH // 2], StorageError)
    assert len(await storage.history(HistoryQuery("R1", limit=1000))) == BATCH - 1
    assert len(fanned_out) == BATCH - 1
    assert (pipeline.stats.stored, pipeline.stats.duplicates) == (BATCH - 1, 0)
