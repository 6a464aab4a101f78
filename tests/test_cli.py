"""`spotbox run` started as a subprocess, the way a user starts it, reached over its real ports."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shlex
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import pytest

from spotbox.users import Users
from tests.conftest import SPOTBOX, fresh_postgres_database, require_tool
from tests.helpers import known_user, mqtt_client, open_feed, payload

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
    assert f"start with --{which}-port 0 (any free port)" in error
    # Both ports are bound before storage is opened: a failed start leaves no database behind.
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://localhost/spotbox", "--database-url"),
        ("sqlite:////no/such/folder/spotbox.db", "folder /no/such/folder does not exist"),
        ("postgresql://postgres@127.0.0.1:1/spotbox", "cannot reach PostgreSQL"),
    ],
)
async def test_bad_database_url_is_a_one_line_error(url: str, expected: str) -> None:
    """Test that an unusable database URL stops spotbox with one clear line naming --database-url."""
    error = await failed_start("--mqtt-port", "0", "--http-port", "0", "--database-url", url)
    assert error.startswith("Error: --database-url: ")
    assert expected in error


@pytest.mark.postgres
async def test_missing_postgresql_database_is_a_one_line_error() -> None:
    """Test that a PostgreSQL database that does not exist stops spotbox with one line naming --database-url."""
    async with fresh_postgres_database() as url:
        missing = urlunsplit(urlsplit(url)._replace(path="/spotbox_no_such_database"))
    error = await failed_start("--mqtt-port", "0", "--http-port", "0", "--database-url", missing)
    assert error.startswith("Error: --database-url: ")
    assert 'database "spotbox_no_such_database" does not exist' in error


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        (b'{"type": "strin"}', "(at $.type)"),
        (b'{"properties": {"a": {"minimum": "x"}}}', "(at $.properties.a.minimum)"),
    ],
)
async def test_invalid_schema_is_one_line(tmp_path: Path, schema: bytes, where: str) -> None:
    """Test that a --schema that is no JSON Schema is one line saying what and where, not a metaschema dump."""
    path = tmp_path / "schema.json"
    path.write_bytes(schema)
    db = tmp_path / "x.db"
    error = await failed_start(
        "--mqtt-port", "0", "--http-port", "0", "--schema", str(path), "--database-url", f"sqlite:///{db}"
    )
    assert error.startswith(f"Error: --schema: {path} is not a JSON Schema 2020-12 document: ")
    assert error.endswith(where)
    assert not db.exists()


async def test_a_second_run_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    """Test that a second spotbox on the same SQLite file is refused naming the file and the first one's pid,
    and that after the first is killed (-9) a new one starts: the lock dies with its holder."""
    db = tmp_path / "spotbox.db"
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", f"sqlite:///{db}")
    first = await start_spotbox(*args)
    try:
        error = await failed_start(*args)
        assert error == (
            f"Error: --database-url: SQLite database {db} is in use by another spotbox (pid {first.proc.pid}); "
            "stop it, or give this one another database"
        )
    finally:
        first.proc.kill()
        async with asyncio.timeout(20):
            await first.proc.wait()
    async with spotbox_process(*args):
        pass


async def test_public_mqtt_address_without_users_is_refused() -> None:
    """Test that MQTT on a non-loopback address is refused at start (README, Security)."""
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


@pytest.mark.parametrize("users", [False, True], ids=["open", "users"])
async def test_logged_commands_reach_the_live_feed(tmp_path: Path, users: bool) -> None:
    """Test the quick start: the curl and mosquitto_pub lines spotbox logs, run as they are (with --users, with the
    robot's password for PASSWORD), show a status live."""
    tools = {"curl": require_tool("curl"), "mosquitto_pub": require_tool("mosquitto_pub")}
    # aiohttp sends an SSE answer's headers with its first bytes: a short ping gets them to curl soon.
    args: tuple[str, ...] = ("--mqtt-port", "0", "--http-port", "0", "--sse-ping-s", "0.2")
    if users:
        robots = Users(tmp_path / "users.json").with_user(known_user("ROBOT-001", "pw-1"))
        robots.save()
        args += ("--users", str(robots.path))
    async with spotbox_process(*args, "--database-url", f"sqlite:///{tmp_path / 'x.db'}") as box:
        stderr = box.proc.stderr
        assert stderr is not None
        commands: dict[str, list[str]] = {}
        async with asyncio.timeout(10):
            while len(commands) < 2:
                logged = (await stderr.readline()).decode()
                for prefix in ("watch a robot live: ", "publish a status: "):
                    if prefix in logged:
                        command = shlex.split(logged.split(prefix, 1)[1].replace("PASSWORD", "pw-1"))
                        commands[command[0]] = [tools[command[0]], *command[1:]]
        assert f"-p {box.mqtt_port}" in shlex.join(commands["mosquitto_pub"])
        curl = await asyncio.create_subprocess_exec(
            *commands["curl"], "--silent", "--include", "--max-time", "30", stdout=asyncio.subprocess.PIPE
        )
        assert curl.stdout is not None
        try:
            async with asyncio.timeout(20):
                # The answer's headers: the feed is subscribed before anything is published.
                assert (await curl.stdout.readline()).startswith(b"HTTP/1.1 200")
                while await curl.stdout.readline() != b"\r\n":
                    pass
                publish = await asyncio.create_subprocess_exec(*commands["mosquitto_pub"])
                assert await publish.wait() == 0
                while not (line := await curl.stdout.readline()).startswith(b"data:"):
                    assert line
        finally:
            curl.kill()
            await curl.wait()
    assert orjson.loads(line[5:])["serial_number"] == "ROBOT-001"


def _soft_open_files(pid: int) -> int:
    """The soft "Max open files" limit of a running process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit in /proc")


async def test_run_raises_its_open_files_limit_and_warns_when_it_cannot_hold_the_fleet(tmp_path: Path) -> None:
    """Test that `spotbox run` started with a low soft limit of open files raises it to the hard limit, and warns
    when --max-connections would need more descriptors than even the hard limit allows."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    database = f"sqlite:///{tmp_path / 'fd.db'}"
    args = ("--http-port", "0", "--mqtt-port", "0", "--database-url", database, "--max-connections", str(hard + 1))
    with_low_limit = partial(resource.setrlimit, resource.RLIMIT_NOFILE, (low, hard))
    proc = await asyncio.create_subprocess_exec(
        SPOTBOX, "run", *args, stderr=asyncio.subprocess.PIPE, preexec_fn=with_low_limit
    )
    assert proc.stderr is not None
    log = b""
    try:
        async with asyncio.timeout(20):
            while b"http listening" not in log:
                line = await proc.stderr.readline()
                assert line, log.decode()
                log += line
        raised = _soft_open_files(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.communicate()
    assert raised == hard
    assert b"open files limit" in log
    assert b"--max-connections" in log
