"""Hand-built MQTT 3.1.1 packets over a plain socket: for what a well-behaved client library refuses to send."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


def remaining_length(length: int) -> bytes:
    """The variable-length "remaining length" of a fixed header."""
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def mqtt_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, username: str | None = None, password: str | None = None) -> bytes:
    """CONNECT, protocol level 4, clean session, keep-alive 60 s."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = mqtt_string(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + mqtt_string(client_id.encode())
    if username is not None:
        body += mqtt_string(username.encode())
    if password is not None:
        body += mqtt_string(password.encode())
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    """PUBLISH with a raw (possibly invalid UTF-8) topic."""
    body = mqtt_string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + remaining_length(len(body)) + body


def subscribe_packet(body: bytes) -> bytes:
    """SUBSCRIBE with a hand-made body (packet id, then filters with their QoS)."""
    return b"\x82" + remaining_length(len(body)) + body


@dataclass
class RawClient:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_packet(self) -> tuple[int, bytes]:
        """The next packet from the server: (first byte, body)."""
        first = (await self.reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            byte = (await self.reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return first, await self.reader.readexactly(length)

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
