"""Acknowledged means stored: kill -9 under load loses nothing a publisher saw acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence

import aiohttp
import aiomqtt
import orjson
import pytest

from spotbox.errors import StorageUnavailableError
from spotbox.settings import Settings
from spotbox.status import StatusRecord
from spotbox.storage import Storage
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, nth_status
from tests.test_cli import start_spotbox

MESSAGES = 3000
KILL_AFTER = 400


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


async def assert_acked_stored_once(args: tuple[str, ...], serial: str, acked: set[int]) -> None:
    """Restart `spotbox run` on the same database: each status numbered in `acked` is stored, none twice."""
    second = await start_spotbox(*args)
    try:
        stored = await history_ts(f"http://127.0.0.1:{second.http_port}", serial)
    finally:
        second.proc.terminate()
        await second.proc.wait()
    assert len(stored) == len(set(stored)), "a status was stored twice"
    expected = {orjson.loads(nth_status(n))["timestamp"] for n in acked}
    missing = expected - set(stored)
    assert not missing, f"{len(missing)} acknowledged statuses lost"


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
    results: list[BaseException | None] = []
    with contextlib.suppress(aiomqtt.MqttError):  # leaving the client once the server is gone
        async with mqtt_client(first.mqtt_port, max_inflight_messages=50) as client:
            publishes = [asyncio.create_task(publish(client, n)) for n in range(MESSAGES)]
            async with asyncio.timeout(20):
                await kill
                await first.proc.wait()
            # No PUBACK can come from a dead process: end the publishes still waiting for one (the client
            # library would wait its full timeout for each).
            for task in publishes:
                task.cancel()
            results = await asyncio.gather(*publishes, return_exceptions=True)
    assert first.proc.returncode == -9
    assert len(acked) >= KILL_AFTER
    assert len(acked) < MESSAGES, "the kill came too late to interrupt the load"
    assert all(isinstance(r, (type(None), aiomqtt.MqttError, asyncio.CancelledError)) for r in results)

    await assert_acked_stored_once(args, "ROBOT-K9", acked)


class Outage:
    """A fault at the storage I/O seam: write_batch raises StorageUnavailableError while `down` is set."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = True
        self.failed_calls = 0
        self.retried = asyncio.Event()
        real = storage.write_batch

        async def write_batch(records: Sequence[StatusRecord]) -> list[int | None]:
            if self.down:
                self.failed_calls += 1
                if self.failed_calls >= 3:
                    self.retried.set()
                raise StorageUnavailableError("injected outage")
            return await real(records)

        monkeypatch.setattr(storage, "write_batch", write_batch)


async def test_outage_holds_the_ack_and_catches_up(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that while storage fails, PUBACK is withheld and retried; when it returns, the status is stored."""
    outage = Outage(box.storage, monkeypatch)
    async with mqtt_client(box.mqtt_port) as robot:
        publish = asyncio.create_task(robot.publish("robot/ROBOT-OUT/status", nth_status(1), qos=1))
        async with asyncio.timeout(10):
            await outage.retried.wait()
        assert not publish.done(), "acknowledged while storage was down"
        assert not box.pipeline.storage_available
        outage.down = False
        async with asyncio.timeout(10):
            await publish
    assert box.pipeline.storage_available
    assert len(await box.history("ROBOT-OUT")) == 1


async def test_shutdown_during_outage_is_bounded(
    make_box: BoxFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that stopping spotbox while storage is down ends within the shutdown timeout, without acking."""
    box = await make_box(dataclasses.replace(settings, shutdown_timeout_s=0.5))
    outage = Outage(box.storage, monkeypatch)
    async with mqtt_client(box.mqtt_port, timeout=1) as robot:
        publish = asyncio.create_task(robot.publish("robot/ROBOT-OUT/status", nth_status(1), qos=1))
        async with asyncio.timeout(10):
            await outage.retried.wait()
        # Shutdown gives up on the writer after shutdown_timeout_s instead of waiting for storage forever.
        async with asyncio.timeout(5):
            await box.server.close()
        with pytest.raises(aiomqtt.MqttError):
            await publish
