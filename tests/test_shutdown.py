"""Graceful shutdown: SIGTERM or SIGINT under QoS 1 load exits 0 in bounded time, every acknowledged status stored."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import time
from pathlib import Path

import aiomqtt
import pytest

from spotbox.settings import DatabaseURL
from spotbox.storage import open_storage
from tests.helpers import mqtt_client, nth_status
from tests.test_cli import start_spotbox
from tests.test_durability import assert_acked_stored_once
from tests.test_storage import record

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


async def test_sigterm_with_an_unread_resumed_feed_exits_within_seconds(tmp_path: Path) -> None:
    """Test that SIGTERM ends spotbox within seconds while a feed resumed from row 0 is replaying to a client that
    reads nothing (issue 11, item 19: it took about 2 minutes)."""
    url = f"sqlite:///{tmp_path / 'spotbox.db'}"
    storage = open_storage(DatabaseURL.parse(url))
    await storage.open()
    # Some 10 MB of events to replay: far more than the socket buffers between the server and the client hold.
    await storage.write_batch([record("R1", minute) for minute in range(20_000)])
    await storage.close()
    server = await start_spotbox("--mqtt-port", "0", "--http-port", "0", "--database-url", url)
    assert server.proc.stderr is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.http_port))
        request = "GET /robots/R1/feed HTTP/1.1\r\nHost: spotbox\r\nLast-Event-ID: 0\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        async with asyncio.timeout(20):
            assert (await loop.sock_recv(sock, 1024)).startswith(b"HTTP/1.1 200")
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        async with asyncio.timeout(30):
            rest, _ = await asyncio.gather(server.proc.stderr.read(), server.proc.wait())
        took = time.monotonic() - started
    finally:
        sock.close()
    log = (b"".join(server.log) + rest).decode()
    assert server.proc.returncode == 0, log
    assert took < 5, f"shutdown took {took:.1f} s"
    assert "Traceback" not in log
