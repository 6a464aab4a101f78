"""Graceful shutdown: SIGTERM or SIGINT under QoS 1 load exits 0 in bounded time, every acknowledged status stored."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal

import aiomqtt
import pytest

from tests.helpers import mqtt_client, nth_status
from tests.test_cli import start_spotbox
from tests.test_durability import assert_acked_stored_once

WINDOW = 50
STOP_AFTER = 400


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_signal_under_load_loses_nothing_acknowledged(database_url: str, signum: signal.Signals) -> None:
    """Test that a stop signal mid-load ends spotbox with exit 0 and every PUBACKed status stored once."""
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", database_url)
    first = await start_spotbox(*args)
    assert first.proc.stderr is not None
    acked: set[int] = set()
    numbers = itertools.count()
    enough = asyncio.Event()

    async def publish_until_cut_off(client: aiomqtt.Client) -> None:
        # Publishes without end: only the shutdown stops the load, so the signal always lands mid-load.
        with contextlib.suppress(aiomqtt.MqttError):
            while True:
                n = next(numbers)
                await client.publish("robot/ROBOT-STOP/status", nth_status(n), qos=1)
                acked.add(n)
                if len(acked) >= STOP_AFTER:
                    enough.set()

    # The bound: spotbox exits well inside this, or the test fails on the timeout.
    async with asyncio.timeout(60):
        with contextlib.suppress(aiomqtt.MqttError):  # leaving the client once the server is gone
            async with mqtt_client(first.mqtt_port, max_inflight_messages=WINDOW) as client:
                workers = [asyncio.create_task(publish_until_cut_off(client)) for _ in range(WINDOW)]
                await enough.wait()
                first.proc.send_signal(signum)
                # The load ends when spotbox has exited, whether or not the client library noticed the hang-up.
                rest, _ = await asyncio.gather(first.proc.stderr.read(), first.proc.wait())
                for worker in workers:
                    worker.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    log = (b"".join(first.log) + rest).decode()
    assert first.proc.returncode == 0, log
    assert "Traceback" not in log
    assert "stopped" in log
    assert len(acked) >= STOP_AFTER

    await assert_acked_stored_once(args, "ROBOT-STOP", acked)
