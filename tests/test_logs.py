"""Log injection: whatever a client sends, the text log stays one line per record with no terminal codes."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aiohttp

from spotbox.loadgen import connect_packet, mqtt_string, publish_packet, read_packet
from spotbox.logs import LOG_QUEUE_MAX, JsonFormatter, TextFormatter
from spotbox.users import Users
from tests.helpers import known_user, payload
from tests.test_cli import start_spotbox

# A forged record: a newline, then what a real record looks like, then a terminal escape (clear screen, red).
FORGED = "\n2026-11-30 12:00:00,000 INFO spotbox.broker.auth: user admin logged in\x1b[2J\x1b[31m\x9b31m\u2028"
RECORD_START = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


def _format(message: str, *args: object, exc: BaseException | None = None) -> str:
    record = logging.LogRecord("spotbox.test", logging.WARNING, __file__, 1, message, args, None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    return TextFormatter().format(record)


def assert_clean(log: bytes) -> None:
    """Every line starts a record or is an indented continuation; no escape or control byte reaches the log."""
    for line in log.splitlines():
        assert RECORD_START.match(line) or line.startswith(b"  "), line
    text = log.decode()
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", text), text
    assert "user admin logged in" not in text or "\\nuser admin" not in text


def test_arguments_are_escaped_onto_one_line() -> None:
    """Test that a newline, ANSI and C1 escapes and U+2028 in a %s argument are written as escapes, on one line."""
    line = _format("anonymous client %s from %s", FORGED, "127.0.0.1")
    assert "\n" not in line
    assert "\\n2026-11-30 12:00:00,000 INFO" in line
    assert "\\x1b[2J\\x1b[31m\\x9b31m\\u2028" in line
    assert_clean(line.encode())


def _fail() -> None:
    raise ValueError(FORGED)


def test_traceback_lines_are_indented_and_escaped() -> None:
    """Test that an exception message cannot forge a record: traceback lines are indented, escapes written out."""
    try:
        _fail()
    except ValueError as exc:
        line = _format("failed", exc=exc)
    first, *rest = line.split("\n")
    assert first.endswith("failed")
    assert rest
    assert all(part.startswith("  ") for part in rest)
    assert "\\x1b[2J" in line
    assert_clean(line.encode())


async def test_client_strings_cannot_forge_log_lines(tmp_path: Path) -> None:
    """Test over the real broker and HTTP that a client id, a topic and a JSON key with a newline and ANSI escapes
    leave the text log one line per record, escaped."""
    users_path = tmp_path / "users.json"
    Users(users_path).with_user(known_user("ROBOT-1", "secret")).save()
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", f"sqlite:///{tmp_path / 'db'}")
    box = await start_spotbox(*args, "--users", str(users_path), "--log-format", "text")
    try:
        # Before login: an anonymous client whose client id forges a record.
        reader, writer = await asyncio.open_connection("127.0.0.1", box.mqtt_port)
        writer.write(connect_packet(f"evil{FORGED}"))
        await writer.drain()
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
        # After login: a status topic whose serial level forges a record.
        reader, writer = await asyncio.open_connection("127.0.0.1", box.mqtt_port)
        writer.write(connect_packet("robot-1", username="ROBOT-1", password="secret"))  # noqa: S106 - a test user
        async with asyncio.timeout(10):
            assert (await reader.readexactly(4))[::3] == b"\x20\x00"
        writer.write(publish_packet(mqtt_string(f"robot/x{FORGED}/status"), 1, payload(), 1))
        writer.write(b"\xe0\x00")
        await writer.drain()
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()
        # Over HTTP: a repeated JSON key that forges a record, named in the rejection line.
        key = f"k{FORGED}".encode().replace(b"\n", b"\\n").replace(b"\x1b", b"\\u001b")
        body = payload()[:-1] + b',"' + key + b'":1,"' + key + b'":2}'
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{box.http_port}/robots/ROBOT-1/status"
            headers = {"Authorization": aiohttp.encode_basic_auth("ROBOT-1", "secret")}
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 422, await resp.text()
                assert (await resp.json())["detail"]["field"].startswith("k\n2026")
    finally:
        box.proc.terminate()
    assert box.proc.stderr is not None
    async with asyncio.timeout(20):
        log = b"".join(box.log) + await box.proc.stderr.read()
        await box.proc.wait()
    assert_clean(log)
    assert b"serial=robot/x" not in log  # the serial is the topic level only
    assert b"\\n2026-11-30 12:00:00,000 INFO spotbox.broker.auth: user admin logged in\\x1b[2J" in log


async def test_a_log_reader_that_stops_reading_never_stalls_the_broker(tmp_path: Path) -> None:
    """Test that with its stderr not read (a stalled terminal or log driver), `spotbox run` keeps acknowledging
    statuses while it logs far more than a pipe holds, and, once stderr is read again, says how many records it
    dropped meanwhile."""
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", f"sqlite:///{tmp_path / 'db'}")
    box = await start_spotbox(*args, "--log-format", "text")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", box.mqtt_port)
        writer.write(connect_packet("flooder"))
        async with asyncio.timeout(10):
            assert (await read_packet(reader))[0] == 0x20
        # A rejection is a warning line of about 300 bytes: more lines than the log queue holds, and megabytes
        # more than the 64 KiB of a pipe nobody reads.
        topic = mqtt_string("robot/R-1/status")
        invalid = publish_packet(topic, 0, payload(battery_level=500), 0)
        for _ in range(LOG_QUEUE_MAX + 2_000):
            writer.write(invalid)
        writer.write(publish_packet(topic, 7, payload(), 1))
        await writer.drain()
        async with asyncio.timeout(30):
            first, body = await read_packet(reader)
        assert (first, body) == (0x40, b"\x00\x07")  # PUBACK: stored and acknowledged
        writer.close()
    finally:
        box.proc.terminate()
    assert box.proc.stderr is not None
    async with asyncio.timeout(30):
        log = await box.proc.stderr.read()
        await box.proc.wait()
    notes = re.findall(rb"WARNING spotbox.logs: (\d+) log records dropped: stderr was not read", log)
    assert notes, log[-2000:]
    # Every rejection is in the log or in the count of a note.
    assert log.count(b"rejected status") + sum(int(dropped) for dropped in notes) >= LOG_QUEUE_MAX + 2_000


def test_json_format_stays_safe() -> None:
    """Test that the JSON log format escapes the same strings (a JSON string cannot hold a raw newline)."""
    record = logging.LogRecord("spotbox.test", logging.WARNING, __file__, 1, "client %s", (FORGED,), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "\x1b" not in line
