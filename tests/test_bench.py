"""`spotbox bench` runs end to end and reports the figures it promises (the figures themselves are not judged)."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import SPOTBOX, require_tool


async def test_bench_json_reports_both_stacks() -> None:
    """Test that a small bench run stores every message it sent and reports spotbox and the classic stack."""
    require_tool("mosquitto")  # the classic stack's broker
    proc = await asyncio.create_subprocess_exec(
        SPOTBOX,
        "bench",
        "--robots",
        "2",
        "--messages",
        "200",
        "--sse",
        "2",
        "--baseline-messages",
        "50",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    figures = orjson.loads(out)
    assert figures["stored"] == 200
    assert figures["stored_per_s"] > 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert figures["peak_rss_mb"] > 0
    assert figures["baseline"]["stored"] == 50
    assert figures["ratio_vs_baseline"] > 0
