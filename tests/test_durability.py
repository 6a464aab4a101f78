"""Acknowledged means stored: kill -9 under load loses nothing a publisher saw acknowledged."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiohttp
import aiomqtt
import orjson

from tests.helpers import mqtt_client
from tests.test_cli import start_spotbox

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
MESSAGES = 3000
KILL_AFTER = 400


def nth_status(n: int) -> bytes:
    """The n-th status: a unique timestamp identifies it in the history."""
    ts = (T0 + timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z")
    return orjson.dumps(
        {
            "battery_level": 50,
            "battery_status": "DISCHARGING",
            "driving_status": "IDLE",
            "location": {"latitude": 1.0, "longitude": 2.0, "height": 3.0},
            "timestamp": ts,
        }
    )


async def history_ts(base: str, serial: str) -> list[str]:
    """Every stored ts of `serial`, following cursors."""
    seen: list[str] = []
    params = {"limit": "5000"}
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base}/robots/{serial}/history", params=params) as resp:
                page = await resp.json()
            seen.extend(item["ts"] for item in page["items"])
            if page["next_cursor"] is None:
                return seen
            params["cursor"] = page["next_cursor"]


async def test_kill_9_loses_nothing_acknowledged(database_url: str) -> None:
    """Test that after kill -9 mid-load and a restart, every PUBACKed status is stored exactly once."""
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", database_url)
    first = await start_spotbox(*args)
    acked: set[int] = set()
    enough = asyncio.Event()

    async def publish(client: aiomqtt.Client, n: int) -> None:
        await client.publish("robot/ROBOT-K9/status", nth_status(n), qos=1)
        acked.add(n)
        if len(acked) >= KILL_AFTER:
            enough.set()

    async def killer() -> None:
        await enough.wait()
        first.proc.kill()

    kill = asyncio.create_task(killer())
    try:
        async with mqtt_client(first.mqtt_port, max_inflight_messages=50) as client:
            results = await asyncio.gather(*(publish(client, n) for n in range(MESSAGES)), return_exceptions=True)
    except aiomqtt.MqttError:
        results = []
    async with asyncio.timeout(20):
        await kill
        await first.proc.wait()
    assert first.proc.returncode == -9
    assert len(acked) >= KILL_AFTER
    assert len(acked) < MESSAGES, "the kill came too late to interrupt the load"
    assert all(isinstance(r, (type(None), aiomqtt.MqttError)) for r in results)

    second = await start_spotbox(*args)
    try:
        stored = await history_ts(f"http://127.0.0.1:{second.http_port}", "ROBOT-K9")
    finally:
        second.proc.terminate()
        await second.proc.wait()
    assert len(stored) == len(set(stored)), "a status was stored twice"
    expected = {orjson.loads(nth_status(n))["timestamp"] for n in acked}
    missing = expected - set(stored)
    assert not missing, f"{len(missing)} acknowledged statuses lost"
