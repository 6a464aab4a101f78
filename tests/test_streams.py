"""SSE streams are a bounded resource: a cap with a clear 503, and idle streams that do not slow ingest down."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from pathlib import Path

import pytest

from spotbox import loadgen
from spotbox.cli import collect_less
from spotbox.keys import HUB
from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.helpers import open_feed
from tests.test_sse_load import open_stalled_feed

# Statuses per ingest leg, and the robots publishing them (loadgen names them BENCH-0000, ...).
LEG, ROBOTS = 3000, 3
# Idle streams as a fleet has them (fan-out target of issue 12): 10 consoles on /feed, the rest robot pages, of
# which one per publishing robot. Scaled down from 1,000 to keep the test fast on two shared cores.
CONSOLES, PAGES = 10, 290


@pytest.fixture
async def sqlite_box(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite with at most 3 streams."""
    settings = Settings(
        http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}", batch_wait_ms=1, max_streams=3
    )
    return await make_box(settings)


async def test_streams_beyond_the_cap_are_503(sqlite_box: Box) -> None:
    """Test that with --max-streams open, one more feed is a 503 in the error shape, and a freed slot is reusable."""
    box = sqlite_box
    async with open_feed(box.http, f"{box.base_url}/feed"), open_feed(box.http, f"{box.base_url}/robots/R1/feed"):
        async with open_feed(box.http, f"{box.base_url}/robots/R2/feed"):
            for path in ("/feed", "/robots/R3/feed"):
                async with box.http.get(f"{box.base_url}{path}") as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"]
                    body = await resp.json()
            assert body == {
                "error": "too many open feeds: at most 3 (--max-streams); retry later",
                "detail": {"max_streams": 3},
            }
        # The third stream has ended: its slot is free again.
        async with asyncio.timeout(10):
            while True:
                async with box.http.get(f"{box.base_url}/robots/R3/feed") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)


async def ingest_rate(box: Box) -> float:
    """Statuses stored per CPU second of this process (server and publishers) for one leg of QoS 1 publishing.

    CPU time rather than wall time: the machine is shared, and other processes' load must not decide the ratio.
    """
    started = time.process_time()
    result = await loadgen.drive("127.0.0.1", box.mqtt_port, loadgen.Load(ROBOTS, LEG, window=50))
    assert result.acked == LEG
    return LEG / (time.process_time() - started)


async def stream_count_reaches(box: Box, count: int) -> None:
    """Wait until the server has `count` feeds open."""
    async with asyncio.timeout(30):
        while box.server.app[HUB].stream_count != count:  # noqa: ASYNC110 - the hub has no event for this
            await asyncio.sleep(0.05)


async def idle_leg(box: Box) -> float:
    """An ingest leg while CONSOLES + PAGES feeds are open and read nothing; they are closed afterwards.

    A first, unmeasured leg fills the socket buffers of the feeds that receive statuses, which then take nothing
    more: idle, as a client that stopped reading is (a reading feed's cost is the fan-out bench's subject).
    """
    paths = ["/feed"] * CONSOLES + [f"/robots/BENCH-{n:04d}/feed" for n in range(PAGES)]
    idle: list[socket.socket] = []
    try:
        idle = list(await asyncio.gather(*(open_stalled_feed(box, path) for path in paths)))
        await stream_count_reaches(box, len(paths))
        await ingest_rate(box)
        return await ingest_rate(box)
    finally:
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.close()
        await stream_count_reaches(box, 0)


# A ratio of CPU seconds: beside three other test processes on two cores it swung from 0.48 to 0.89 in one run.
@pytest.mark.slow
async def test_idle_streams_keep_ingest_above_90_percent(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that 300 open feeds that read nothing (consoles and robot pages) keep ingest at 90% of its rate or more
    (statuses per CPU second), against legs without them just before and after.

    On two shared cores one leg varies by 10-15% by itself: the best of three such runs decides. A cost of the idle
    feeds themselves (issue 11: 1,900 of them cut ingest to 35 statuses/s) fails all three.
    """
    settings = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}", batch_wait_ms=1)
    box = await make_box(settings)
    # The collector as `spotbox run` sets it: with CPython's defaults, opening 300 feeds in this process (which also
    # holds pytest's whole heap) set off full collections of that heap within a leg of 0.1 CPU s, and the ratio
    # measured pytest (0.48 in one run), not spotbox.
    thresholds = gc.get_threshold()
    collect_less()
    gc.freeze()
    try:
        runs = await idle_runs(box)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    assert max(runs)[0] >= 0.9, f"(ratio, idle, before, after) per CPU s: {runs}"


async def idle_runs(box: Box) -> list[tuple[float, float, float, float]]:
    """Up to three runs of (ratio, idle leg, leg before, leg after), until one reaches 0.9."""
    await ingest_rate(box)  # warm up: first connections, first pages of the file
    runs = []
    for _ in range(3):
        before = await ingest_rate(box)
        idle = await idle_leg(box)
        after = await ingest_rate(box)
        runs.append((idle / ((before + after) / 2), idle, before, after))
        if runs[-1][0] >= 0.9:
            break
    return runs
