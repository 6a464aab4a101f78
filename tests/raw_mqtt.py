"""Hand-built MQTT 3.1.1 packets over a plain socket: for what a well-behaved client library refuses to send."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from spotbox import loadgen
from spotbox.loadgen import mqtt_string
from spotbox.mqtt.framing import frame

CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


def publish_packet(topic: bytes, payload: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    """PUBLISH with a raw (possibly invalid UTF-8) topic."""
    return loadgen.publish_packet(mqtt_string(topic), packet_id, payload, qos)


def subscribe_packet(body: bytes) -> bytes:
    """SUBSCRIBE with a hand-made body (packet id, then filters with their QoS)."""
    return frame(0x82, body)


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self) -> tuple[int, bytes]:
        """The next packet from the server: (first byte, body)."""
        return await loadgen.read_packet(self.reader)

    async def connack(self) -> int:
        """The return code of the CONNACK the server answers with."""
        first, body = await self.read_packet()
        assert first == 0x20, first
        return body[1]

    async def wait_closed_by_server(self) -> None:
        """Return once the server has closed the connection (end of stream, or a reset); callers bound the wait
        with asyncio.timeout, so a server that keeps the connection open fails the test."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionResetError:
            pass  # closed with our unread bytes still in its buffer: the kernel answers with a reset


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    """A plain TCP connection to the MQTT port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
