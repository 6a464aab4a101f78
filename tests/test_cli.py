"""`spotbox run` started as a subprocess, the way a user starts it, reached over its real ports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import SPOTBOX, require_tool
from tests.helpers import mqtt_client, open_feed, payload

LISTENING = re.compile(rb"(mqtt|http) listening on (?:https?://)?([\d.]+):(\d+)")


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    mqtt_port: int
    http_port: int
    log: list[bytes]


async def run_spotbox(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        SPOTBOX,
        "run",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def start_spotbox(*args: str, env: dict[str, str] | None = None) -> Process:
    """`spotbox run`, once both listeners have logged their real address."""
    proc = await run_spotbox(*args, env=env)
    assert proc.stderr is not None
    ports: dict[bytes, int] = {}
    log: list[bytes] = []
    async with asyncio.timeout(20):
        while len(ports) < 2:
            line = await proc.stderr.readline()
            assert line, b"".join(log).decode()
            log.append(line)
            if match := LISTENING.search(line):
                ports[match.group(1)] = int(match.group(3))
    return Process(proc, ports[b"mqtt"], ports[b"http"], log)


@asynccontextmanager
async def spotbox_process(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Process]:
    """`spotbox run` until both listeners log their real address; SIGTERM at the end must exit 0."""
    started = await start_spotbox(*args, env=env)
    proc, log = started.proc, started.log
    assert proc.stderr is not None
    try:
        yield started
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        rest = await proc.stderr.read()
        await proc.wait()
    assert proc.returncode == 0, (b"".join(log) + rest).decode()
    assert b"Traceback" not in rest


async def test_run_serves_mqtt_feed_and_history(database_url: str) -> None:
    """Test the README path: env-configured spotbox run, mosquitto_pub publishes, feed and history show it."""
    mosquitto_pub = require_tool("mosquitto_pub")
    env = {"SPOTBOX_HTTP_PORT": "0", "SPOTBOX_MQTT_PORT": "0", "DATABASE_URL": database_url}
    async with spotbox_process(env=env) as box, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{box.http_port}"
        async with open_feed(http, f"{base}/robots/ROBOT-001/feed") as feed:
            pub = await asyncio.create_subprocess_exec(
                mosquitto_pub,
                "-p",
                str(box.mqtt_port),
                "-q",
                "1",
                "-t",
                "robot/ROBOT-001/status",
                "-m",
                payload().decode(),
            )
            async with asyncio.timeout(10):
                assert await pub.wait() == 0
                event = await feed.next()
        assert event.json()["serial_number"] == "ROBOT-001"
        async with http.get(f"{base}/robots/ROBOT-001/history") as resp:
            assert resp.status == 200
            page = await resp.json()
        assert [item["id"] for item in page["items"]] == [event.json()["id"]]


def one_line_error(stderr: bytes) -> str:
    text = stderr.decode().strip()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    return lines[0]


async def failed_start(*args: str) -> str:
    proc = await run_spotbox(*args)
    async with asyncio.timeout(20):
        _, stderr = await proc.communicate()
    assert proc.returncode == 1, stderr.decode()
    return one_line_error(stderr)


@pytest.mark.parametrize("which", ["mqtt", "http"])
async def test_port_in_use_is_a_one_line_error(tmp_path: Path, which: str) -> None:
    """Test that a port already taken gives one line naming the port and the option, and no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"mqtt": "0", "http": "0", which: str(port)}
        error = await failed_start(
            "--mqtt-port",
            ports["mqtt"],
            "--http-port",
            ports["http"],
            "--database-url",
            f"sqlite:///{tmp_path / 'x.db'}",
        )
    assert f"127.0.0.1:{port}" in error
    assert "address already in use" in error
    assert f"--{which}-port" in error


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://localhost/spotbox", "--database-url"),
        ("sqlite:////no/such/folder/spotbox.db", "folder /no/such/folder does not exist"),
        ("postgresql://postgres@127.0.0.1:1/spotbox", "cannot reach PostgreSQL"),
    ],
)
async def test_bad_database_url_is_a_one_line_error(url: str, expected: str) -> None:
    """Test that an unusable database URL stops spotbox with one clear line."""
    error = await failed_start("--mqtt-port", "0", "--http-port", "0", "--database-url", url)
    assert expected in error


async def test_public_mqtt_address_without_users_is_refused() -> None:
    """Test that MQTT on a non-loopback address is refused at start (SPEC section 7)."""
    error = await failed_start("--mqtt-host", "0.0.0.0", "--mqtt-port", "0", "--http-port", "0")
    assert "--mqtt-host" in error
    assert "loopback" in error


async def test_json_logs_are_one_object_per_line_with_rejections(tmp_path: Path) -> None:
    """Test that with --log-format json every line spotbox logs is one JSON object, a rejection with its serial,
    field and reason among them."""
    args = ("--mqtt-port", "0", "--http-port", "0", "--log-format", "json")
    async with spotbox_process(*args, "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}") as box:
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/ROBOT-LOG/status", payload(battery_level=150), qos=1)
        stderr = box.proc.stderr
        assert stderr is not None
        async with asyncio.timeout(10):
            while b"status_rejected" not in b"".join(box.log):
                box.log.append(await stderr.readline())
    records = [orjson.loads(line) for line in box.log if line.strip()]
    assert all(isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record) for record in records)
    rejection = next(record for record in records if record.get("event") == "status_rejected")
    assert rejection["serial"] == "ROBOT-LOG"
    assert rejection["field"] == "battery_level"
    assert rejection["reason"] == "battery_level: 150 is greater than the maximum of 100"
    assert rejection["level"] == "warning"
