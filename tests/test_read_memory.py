"""Read routes hold what they answer, not the raw payloads they do not return (issue 11, item 13)."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from spotbox.storage.base import PAGE_PAYLOAD_BUDGET
from tests.conftest import Box
from tests.helpers import open_feed
from tests.test_storage import record

ROWS = 300
BLOB = 100_000  # bytes of an extra field in each status: 30 MB of payloads in all
MiB = 1024 * 1024


async def seed(box: Box) -> list[int]:
    """ROWS statuses of R1 with about BLOB bytes of payload each, through the real storage."""
    ids: list[int] = []
    for start in range(0, ROWS, 50):
        batch = [record("R1", minute, blob="x" * BLOB) for minute in range(start, start + 50)]
        ids.extend(row_id for row_id in await box.storage.write_batch(batch) if row_id is not None)
    return ids


@asynccontextmanager
async def peak_mib() -> AsyncIterator[list[float]]:
    """The peak of Python memory allocated inside the block (server and client: one process), in MiB."""
    peak: list[float] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1] / MiB)
        tracemalloc.stop()


async def measured(call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    async with peak_mib() as peak:
        result = await call()
    return result, peak[0]


async def test_history_without_payloads_never_reads_them(box: Box) -> None:
    """Test that a 300-row history page costs far less than the 30 MB of payloads it does not return."""
    await seed(box)

    async def page() -> Any:
        async with box.http.get(f"{box.base_url}/robots/R1/history", params={"limit": "5000"}) as resp:
            return await resp.json()

    body, peak = await measured(page)
    assert len(body["items"]) == ROWS
    assert peak < 5, f"{peak:.1f} MiB"


async def test_history_with_payloads_is_bounded_per_page(box: Box) -> None:
    """Test that include_payload pages stop at the payload budget with a cursor, and the cursor walks every row."""
    ids = await seed(box)
    items: list[dict[str, Any]] = []
    params = {"limit": "5000", "include_payload": "true"}
    peaks = []
    while True:

        async def page(query: dict[str, str] = params) -> Any:
            async with box.http.get(f"{box.base_url}/robots/R1/history", params=query) as resp:
                return await resp.json()

        body, peak = await measured(page)
        peaks.append(peak)
        items.extend(body["items"])
        assert len(body["items"]) * BLOB <= PAGE_PAYLOAD_BUDGET + BLOB
        if body["next_cursor"] is None:
            break
        params = {**params, "cursor": body["next_cursor"]}
    assert sorted(item["id"] for item in items) == ids
    assert all(len(item["payload"]["blob"]) == BLOB for item in items)
    assert len(peaks) >= ROWS * BLOB // PAGE_PAYLOAD_BUDGET
    # The page's rows and JSON, the client's copy and its parse: a few times the budget, never the 30 MB.
    assert max(peaks) < 5 * PAGE_PAYLOAD_BUDGET / MiB, peaks


async def test_fleet_and_latest_never_read_payloads(box: Box) -> None:
    """Test that /robots and /robots/{serial} answer without reading any raw payload."""
    await seed(box)
    for path in ("/robots", "/robots/R1"):

        async def get(url: str = f"{box.base_url}{path}") -> Any:
            async with box.http.get(url) as resp:
                return await resp.json()

        _, peak = await measured(get)
        assert peak < 1, f"{path}: {peak:.1f} MiB"


async def test_resumed_feed_replays_without_payloads(box: Box) -> None:
    """Test that a feed resumed from row 0 replays 300 statuses holding none of their payloads."""
    ids = await seed(box)

    async def replay() -> list[int]:
        url = f"{box.base_url}/robots/R1/feed"
        async with open_feed(box.http, url, {"Last-Event-ID": "0"}) as feed:
            return [(await feed.next()).json()["id"] for _ in ids]

    got, peak = await measured(replay)
    assert got == ids
    assert peak < 5, f"{peak:.1f} MiB"
