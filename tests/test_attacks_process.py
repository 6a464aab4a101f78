"""Attacks seen from outside the process, on `spotbox run` as an operator starts it (issue 11, items 7 and 17): the
text log escapes what attackers control, and QoS 2 messages never released are freed once their session ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mqtt5
import pytest

from tests.conftest import SPOTBOX
from tests.mqtt5_clients import wire_client
from tests.raw_mqtt import CONNACK_NOT_AUTHORIZED, connect_packet, publish, raw_client
from tests.test_auth import PASSWORDS, write_users

LISTENING = re.compile(rb"mqtt listening on ([\d.]+):(\d+)")
HTTP_LISTENING = re.compile(rb"http listening on http://[\d.]+:(\d+)")
FORGED = "FORGED 2026-11-30 06:00:00,000 INFO spotbox.broker: user admin logged in"
EVIL = f"evil\n{FORGED}\r\n{FORGED}\x1b[2J\x1b[31mred\x07"


@dataclass
class Spotbox:
    """A `spotbox run` subprocess: its MQTT port, and every line it wrote to stderr so far."""

    proc: subprocess.Popen[bytes]
    mqtt_port: int = 0
    http_port: int = 0
    stderr: bytearray = field(default_factory=bytearray)

    def rss(self) -> int:
        """Resident memory of the process, in bytes."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    async def logged(self, text: bytes) -> None:
        """Wait until `text` appears in stderr (the drain thread fills it; polled, there is no event to wait on)."""
        async with asyncio.timeout(10):
            while text not in self.stderr:  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def spotbox_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spotbox]:
    """`spotbox run --users` with the text log (the default), on SQLite, for the whole module."""
    tmp = tmp_path_factory.mktemp("process")
    args = [SPOTBOX, "run", "--mqtt-port", "0", "--http-port", "0", "--users", str(write_users(tmp / "users.json"))]
    args += ["--database-url", f"sqlite:///{tmp / 'x.db'}", "--http-idle-timeout-s", "0.5"]
    # Big buffers are mmap'ed and handed back to the system when freed, so RSS shows what is still held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    box = Spotbox(proc)
    assert proc.stderr is not None
    stderr = proc.stderr

    def drain() -> None:
        for line in iter(stderr.readline, b""):
            box.stderr.extend(line)

    thread = threading.Thread(target=drain, name="spotbox-stderr", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not ((match := LISTENING.search(box.stderr)) and (http := HTTP_LISTENING.search(box.stderr))):
        assert proc.poll() is None, box.stderr.decode()
        assert time.monotonic() < deadline, box.stderr.decode()
        time.sleep(0.02)
    box.mqtt_port = int(match.group(2))
    box.http_port = int(http.group(1))
    yield box
    proc.terminate()
    proc.wait(20)
    thread.join(5)
    stderr.close()


async def test_attacker_strings_are_escaped_in_the_text_log(spotbox_run: Spotbox) -> None:
    """Test that a client id and a topic carrying newlines, a forged log line and terminal escapes are logged
    escaped: no line of the log starts with the forged text, and no escape or control byte reaches it."""
    port = spotbox_run.mqtt_port
    async with raw_client(port) as anonymous:  # refused (no login), and its client id logged
        await anonymous.send(connect_packet(EVIL))
        assert await anonymous.connack() == CONNACK_NOT_AUTHORIZED
    async with wire_client(port, client_id=EVIL) as (_, connack):
        assert connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS
    async with raw_client(port) as robot:  # logged in; a publish outside its grants is logged with its topic
        await robot.send(connect_packet("robot-a", username="ROBOT-A", password=PASSWORDS["ROBOT-A"]))
        assert await robot.connack() == 0
        await robot.send(publish(f"robot/ROBOT-B/{EVIL}", b"x", 1))
        await robot.expect(0x40)
    async with raw_client(port) as marker:
        await marker.send(connect_packet("end-of-attack"))
        await marker.connack()
    await spotbox_run.logged(b"end-of-attack")
    log = bytes(spotbox_run.stderr)
    assert not [line for line in log.splitlines() if line.lstrip().startswith(b"FORGED")]
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", log.replace(b"\r\n", b"\n")), "a control byte in the log"


async def test_unreleased_qos2_memory_is_freed_when_the_session_ends(spotbox_run: Spotbox) -> None:
    """Test that 16 MiB of QoS 2 PUBLISHes never released are no longer held once their (clean) session ended."""
    port = spotbox_run.mqtt_port
    before = spotbox_run.rss()
    async with raw_client(port) as operator:
        await operator.send(connect_packet("hoarder", username="operator", password=PASSWORDS["operator"]))
        assert await operator.connack() == 0
        for n in range(1, 65):
            await operator.send(publish("robot/HOARD/cmd", b"x" * 256 * 1024, 2, n))
            await operator.expect(0x50)  # PUBREC, and never a PUBREL
    async with asyncio.timeout(2):  # RSS has no event to wait on: polled
        while spotbox_run.rss() - before > 8 * 1024 * 1024:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_http_requests_whose_headers_never_end_are_closed(spotbox_run: Spotbox) -> None:
    """Test that HTTP connections trickling header lines and never ending them are closed after
    --http-idle-timeout-s (0.5 s here; aiohttp has no header timeout, and its idle default of an hour let 500 of them
    hold their descriptors and 40 MB), while a whole request is still answered."""
    trickling = [await asyncio.open_connection("127.0.0.1", spotbox_run.http_port) for _ in range(20)]
    for _, writer in trickling:
        writer.write(b"GET /health HTTP/1.1\r\nHost: spotbox\r\n")

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.2)
            for _, writer in trickling:
                if not writer.is_closing():
                    writer.write(b"X-Slow: 1\r\n")

    task = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(4):
            for reader, _ in trickling:
                with contextlib.suppress(ConnectionResetError):
                    while await reader.read(4096):
                        pass
    finally:
        task.cancel()
        for _, writer in trickling:
            writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", spotbox_run.http_port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: spotbox\r\nConnection: close\r\n\r\n")
    assert (await reader.read(4096)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_unparsable_http_requests_are_one_log_line_each(spotbox_run: Spotbox) -> None:
    """Test that a request line over 8 KB and a request with 500 headers get 400 and one WARNING line each in the
    log, not an ERROR with aiohttp's parser traceback (ten lines an attacker could have printed at will)."""
    start = len(spotbox_run.stderr)
    for request in (
        b"GET /robots/" + b"A" * 10_000 + b" HTTP/1.1\r\nHost: spotbox\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(500)) + b"\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", spotbox_run.http_port)
        writer.write(request)
        assert (await reader.read(4096)).split(b" ")[1] == b"400"
        writer.close()
    await spotbox_run.logged(b"bad HTTP request: 400 Too many headers")
    new = bytes(spotbox_run.stderr[start:])
    assert new.count(b"WARNING aiohttp.server: bad HTTP request: 400") == 2, new.decode()
    assert b"Traceback" not in new
    assert b" ERROR " not in new
