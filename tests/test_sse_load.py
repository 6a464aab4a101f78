"""SSE under load: a consumer that stops reading is cut off with a reason; a thousand streams are served at once."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from spotbox import loadgen
from tests.conftest import Box
from tests.helpers import mqtt_client, open_feed, payload
from tests.test_metrics import scrape

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

STREAMS = 1000


async def open_stalled_feed(box: Box, path: str) -> socket.socket:
    """A feed client that sends its request and then never reads, with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", box.server.port))
    await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: spotbox\r\nConnection: close\r\n\r\n".encode())
    return sock


async def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection."""
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_stalled_consumer_is_cut_off_without_slowing_ingest_or_others(box: Box) -> None:
    """Test that a feed client that stops reading gets an `overflow` event and is closed, while every status is
    still acknowledged and stored and a reading client of the same fleet feed receives every one of them."""
    # Enough statuses to fill the kernel's socket buffers and then the stream's 1,000-event buffer.
    robots, messages = 4, 16_000
    stalled = await open_stalled_feed(box, "/feed")
    try:
        async with open_feed(box.http, f"{box.base_url}/feed") as reader:

            async def read_all() -> int:
                seen = 0
                while seen < messages:
                    if (await reader.next()).event == "status":
                        seen += 1
                return seen

            reading = asyncio.create_task(read_all())
            async with asyncio.timeout(120):
                result = await loadgen.drive("127.0.0.1", box.mqtt_port, loadgen.Load(robots, messages, window=50))
                assert await reading == messages
        assert result.acked == messages
        assert box.pipeline.stats.stored == messages
        async with asyncio.timeout(30):
            sent = await read_to_end(stalled)
    finally:
        stalled.close()
    # The overflow event comes last, after the statuses already buffered, then the response ends.
    assert sent.rindex(b"event: overflow") > sent.rindex(b"event: status")
    assert b"fell too far behind" in sent[sent.rindex(b"event: overflow") :]
    assert sent.endswith(b"\r\n0\r\n\r\n"), "the stalled stream was not closed"
    assert sent.count(b"event: status") < messages, "the stalled stream was not cut off"


async def test_a_thousand_streams_each_get_the_status(box: Box) -> None:
    """Test that 1,000 concurrent SSE streams are served and each receives a published status."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"{box.base_url}/robots/ROBOT-CROWD/feed"
        responses: list[aiohttp.ClientResponse] = []
        try:
            async with asyncio.timeout(60):
                feed_timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
                responses = await asyncio.gather(*(http.get(url, timeout=feed_timeout) for _ in range(STREAMS)))
                assert all(resp.status == 200 for resp in responses)
                assert (await scrape(box))["spotbox_sse_streams_open"] == STREAMS
                async with mqtt_client(box.mqtt_port) as robot:
                    await robot.publish("robot/ROBOT-CROWD/status", payload(), qos=1)

                async def first_status(resp: aiohttp.ClientResponse) -> bytes:
                    async for line in resp.content:
                        if line.startswith(b"data: "):
                            return line
                    raise EOFError

                lines = await asyncio.gather(*(first_status(resp) for resp in responses))
        finally:
            for resp in responses:
                resp.close()
    assert len(lines) == STREAMS
    assert len(set(lines)) == 1
    assert b'"serial_number":"ROBOT-CROWD"' in lines[0]
