"""Every client example in examples/ runs as it is, against a running spotbox (the deployment recipes there,
docker-compose.yml and spotbox.service, are checked in test_deploy.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import Box, require_tool
from tests.helpers import mqtt_client, payload, stamp

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

EXAMPLES = Path(__file__).parent.parent / "examples"


async def run_example(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run an example as a user would; its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def box_env(box: Box) -> dict[str, str]:
    """What every example reads to find spotbox."""
    return {"MQTT_PORT": str(box.mqtt_port), "SPOTBOX_URL": box.base_url}


async def test_publish_and_follow_examples(box: Box) -> None:
    """Test that follow_feed.py prints the status that publish_status.py publishes."""
    env = {**os.environ, "MQTT_PORT": str(box.mqtt_port), "SPOTBOX_URL": box.base_url}
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "follow_feed.py"),
        "ROBOT-042",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        assert follower.stdout is not None
        assert await follower.stdout.readline() == b"following ROBOT-042\n"
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "publish_status.py"),
            "ROBOT-042",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await publisher.communicate()
        assert publisher.returncode == 0, err.decode()
        assert b"acknowledged" in out
        followed, err = await follower.communicate()
    assert follower.returncode == 0, err.decode()
    assert b" 76 IDLE" in followed


async def test_paho_example_publishes_over_mqtt_311_by_default(box: Box) -> None:
    """Test that publish_paho.py, as it is, gets its status acknowledged and stored over MQTT 3.1.1."""
    code, out, err = await run_example(
        sys.executable, str(EXAMPLES / "publish_paho.py"), "ROBOT-PAHO", "--battery-level", "61", env=box_env(box)
    )
    assert code == 0, err
    assert out == "published and acknowledged over MQTT 3.1.1: robot/ROBOT-PAHO/status\n"
    assert [item["battery_level"] for item in await box.history("ROBOT-PAHO")] == [61]


async def test_paho_example_over_mqtt5_reports_0x99(box: Box) -> None:
    """Test that publish_paho.py --mqtt-version 5 stores a valid status, and exits 2 naming 0x99's field otherwise."""
    script = str(EXAMPLES / "publish_paho.py")
    code, _, err = await run_example(sys.executable, script, "ROBOT-P5", "--mqtt-version", "5", env=box_env(box))
    assert code == 0, err
    code, _, err = await run_example(
        sys.executable, script, "ROBOT-P5", "--mqtt-version", "5", "--battery-level", "150", env=box_env(box)
    )
    assert code == 2, err
    assert "battery_level: 150 is greater than the maximum of 100" in err
    assert len(await box.history("ROBOT-P5")) == 1


async def test_mosquitto_example_publishes_and_invalid_is_not_stored(box: Box) -> None:
    """Test that publish_mosquitto.sh stores a valid status, and an invalid one is acknowledged but not stored."""
    require_tool("mosquitto_pub")
    script = str(EXAMPLES / "publish_mosquitto.sh")
    code, out, err = await run_example(script, "ROBOT-MOSQ", "58", env=box_env(box))
    assert code == 0, err
    assert out == "published and acknowledged: robot/ROBOT-MOSQ/status\n"
    # MQTT 3.1.1 acknowledges a rejected status too; the acknowledgement comes after the verdict.
    code, _, err = await run_example(script, "ROBOT-MOSQ", "150", env=box_env(box))
    assert code == 0, err
    assert [item["battery_level"] for item in await box.history("ROBOT-MOSQ")] == [58]


@pytest.mark.parametrize(
    "args",
    [pytest.param(("ROBOT-CURL",), id="one-robot"), pytest.param((), id="fleet")],
)
async def test_curl_example_prints_the_live_feed(box: Box, args: tuple[str, ...]) -> None:
    """Test that follow_feed.sh (curl -N) prints a status published after it connected, as SSE lines."""
    require_tool("curl")
    proc = await asyncio.create_subprocess_exec(
        str(EXAMPLES / "follow_feed.sh"),
        *args,
        env={**os.environ, **box_env(box)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            # The first keep-alive comment proves the stream is open, hence subscribed: publish only then.
            first = await proc.stdout.readline()
            assert first.startswith(b": ping"), first or await proc.communicate()
            async with mqtt_client(box.mqtt_port) as client:
                await client.publish("robot/ROBOT-CURL/status", payload(battery_level=33), qos=1)
            lines = []
            while not (line := await proc.stdout.readline()).startswith(b"data: "):
                assert line, "curl ended"
                lines.append(line.strip())
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone when the test failed early
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
    status = orjson.loads(line[len(b"data: ") :])
    assert (status["serial_number"], status["battery_level"]) == ("ROBOT-CURL", 33)
    assert b"event: status" in lines
    assert f"id: {status['id']}".encode() in lines


async def test_history_example_follows_every_cursor(box: Box) -> None:
    """Test that history_pages.py prints every stored status once, oldest first, across pages of 3."""
    async with mqtt_client(box.mqtt_port) as client:
        for n in (4, 1, 6, 0, 3, 5, 2):
            await client.publish("robot/ROBOT-HIST/status", payload(battery_level=90 - n, timestamp=stamp(n)), qos=1)
    code, out, err = await run_example(
        sys.executable, str(EXAMPLES / "history_pages.py"), "ROBOT-HIST", "--page-size", "3", env=box_env(box)
    )
    assert code == 0, err
    *rows, summary = out.splitlines()
    assert summary == "7 statuses in 3 pages"
    stored = await box.history("ROBOT-HIST")
    assert [row.split()[:3] for row in rows] == [
        [str(item["id"]), item["ts"], str(item["battery_level"])] for item in stored
    ]
    assert [row.split()[2] for row in rows] == [str(90 - n) for n in range(7)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("ROBOT-NONE",), "HTTP 404: unknown robot"),
        (("ROBOT-HIST", "--page-size", "0"), "HTTP 400: limit must be an integer from 1 to 5000"),
        (("ROBOT-HIST", "--start-time", "yesterday"), "HTTP 400: start_time is not an ISO 8601 date-time"),
    ],
)
async def test_history_example_reports_spotbox_errors(box: Box, args: tuple[str, ...], message: str) -> None:
    """Test that history_pages.py turns spotbox's JSON error answers into one line and exit status 1."""
    code, out, err = await run_example(sys.executable, str(EXAMPLES / "history_pages.py"), *args, env=box_env(box))
    assert code == 1
    assert out == ""
    assert err.startswith(message), err
