"""Hand-built MQTT 3.1.1 packets over a plain socket: for what a well-behaved client library refuses to send."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from spotbox import loadgen
from spotbox.loadgen import mqtt_string
from spotbox.mqtt.framing import frame

CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5
PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, PINGRESP = 0x40, 0x50, 0x62, 0x70, 0x90, 0xD0


def publish_packet(topic: bytes, payload: bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    """PUBLISH with a raw (possibly invalid UTF-8) topic."""
    return loadgen.publish_packet(mqtt_string(topic), packet_id, payload, qos)


def subscribe_packet(body: bytes) -> bytes:
    """SUBSCRIBE with a hand-made body (packet id, then filters with their QoS)."""
    return frame(0x82, body)


def packet(first: int, body: bytes) -> bytes:
    """Any packet: its first byte (type and flags) and its body, with the remaining length between them."""
    return frame(first, body)


@dataclass(frozen=True)
class Will:
    """A 3.1.1 will: topic (raw bytes allowed), payload, QoS, retain."""

    topic: bytes | str
    payload: bytes
    qos: int = 0
    retain: bool = False


def connect_packet(
    client_id: str | bytes,
    *,
    clean: bool = True,
    keep_alive: int = 60,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
) -> bytes:
    """A 3.1.1 CONNECT with every field a test may need (a will, a keep alive, a raw client id)."""
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    body = mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive) + mqtt_string(client_id)
    if will is not None:
        body += mqtt_string(will.topic) + struct.pack("!H", len(will.payload)) + will.payload
    for credential in (username, password):
        if credential is not None:
            body += mqtt_string(credential)
    return packet(0x10, body)


def subscribe(packet_id: int, *filters: tuple[str | bytes, int]) -> bytes:
    """SUBSCRIBE to each (filter, requested QoS)."""
    body = struct.pack("!H", packet_id) + b"".join(mqtt_string(f) + bytes([qos]) for f, qos in filters)
    return subscribe_packet(body)


def publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1, *, retain: bool = False) -> bytes:
    """PUBLISH at any QoS, retained or not."""
    body = mqtt_string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | retain, body)


def ack(first: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (by its first byte) of `packet_id`."""
    return bytes([first, 2]) + struct.pack("!H", packet_id)


@dataclass(frozen=True)
class Publish:
    """A PUBLISH the server sent, decoded."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None

    @classmethod
    def decode(cls, first: int, body: bytes) -> Publish:
        """Decode a 3.1.1 PUBLISH (first byte and body)."""
        assert first >> 4 == 3, f"expected PUBLISH, got first byte {first:#x}"
        qos = (first >> 1) & 3
        (length,) = struct.unpack_from("!H", body)
        topic = body[2 : 2 + length].decode()
        rest = body[2 + length :]
        packet_id = None
        if qos:
            (packet_id,) = struct.unpack_from("!H", rest)
            rest = rest[2:]
        return cls(topic, rest, qos, bool(first & 1), bool(first & 8), packet_id)


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

    async def expect(self, first: int) -> bytes:
        """The body of the next packet, which must start with `first` (within 10 s)."""
        async with asyncio.timeout(10):
            got, body = await self.read_packet()
        assert got == first, f"expected first byte {first:#x}, got {got:#x} {body!r}"
        return body

    async def expect_publish(self) -> Publish:
        """The next packet, which must be a PUBLISH (within 10 s)."""
        async with asyncio.timeout(10):
            return Publish.decode(*await self.read_packet())

    async def silent_for(self, seconds: float) -> bool:
        """True when the server sends nothing (and keeps the connection) for `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self.read_packet()
        except TimeoutError:
            return True
        except asyncio.IncompleteReadError:
            return False
        return False

    async def wait_closed_by_server(self) -> None:
        """Return once the server has closed the connection (end of stream, or a reset); callers bound the wait
        with asyncio.timeout, so a server that keeps the connection open fails the test."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionResetError:
            pass  # closed with our unread bytes still in its buffer: the kernel answers with a reset

    async def answers_until_closed(self, seconds: float = 5.0) -> list[tuple[int, bytes]]:
        """The packets the server sends until it closes the connection; a PINGRESP (callers send a PINGREQ after
        their attack: a server still reading answers it) ends the list early, and (-1, b"open") ends it when the
        connection is still open after `seconds`."""
        packets: list[tuple[int, bytes]] = []
        try:
            async with asyncio.timeout(seconds):
                while True:
                    packets.append(await self.read_packet())
                    if packets[-1][0] == PINGRESP:
                        return packets
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return packets
        except TimeoutError:
            return [*packets, (-1, b"open")]

    async def closed_within(self, seconds: float = 5.0) -> bytes:
        """Everything the server sends until it closes the connection, which it must within `seconds`."""
        data = b""
        async with asyncio.timeout(seconds):
            try:
                while chunk := await self.reader.read(65536):
                    data += chunk
            except ConnectionResetError:
                pass
        return data


@asynccontextmanager
async def raw_client(port: int, local_host: str | None = None) -> AsyncIterator[RawClient]:
    """A plain TCP connection to the MQTT port (from the loopback address `local_host` when given)."""
    local_addr = (local_host, 0) if local_host is not None else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local_addr)
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@asynccontextmanager
async def raw_session(
    port: int, client_id: str, *, clean: bool = True, keep_alive: int = 60, will: Will | None = None
) -> AsyncIterator[tuple[RawClient, bool]]:
    """A 3.1.1 raw client that was accepted (CONNECT arguments as for `connect_packet`), and its session-present."""
    async with raw_client(port) as client:
        await client.send(connect_packet(client_id, clean=clean, keep_alive=keep_alive, will=will))
        body = await client.expect(0x20)
        assert body[1] == CONNACK_ACCEPTED, body
        yield client, bool(body[0] & 1)


class WsRawClient:
    """MQTT bytes in binary WebSocket messages on `/mqtt`: each `send` is one message, however it splits a packet."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._buffer = bytearray()

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def read_packet(self) -> tuple[int, bytes] | None:
        """The next packet from the server: (first byte, body); None once the server closed the WebSocket."""
        while True:
            if len(self._buffer) >= 2:
                length, shift, index = 0, 0, 1
                while index < len(self._buffer):
                    byte = self._buffer[index]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if not byte & 0x80:
                        break
                if not self._buffer[index - 1] & 0x80 and len(self._buffer) >= index + length:
                    first, body = self._buffer[0], bytes(self._buffer[index : index + length])
                    del self._buffer[: index + length]
                    return first, body
            message = await self.ws.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                return None
            self._buffer.extend(message.data)


@asynccontextmanager
async def ws_raw_client(
    http: aiohttp.ClientSession, base_url: str, headers: dict[str, str] | None = None
) -> AsyncIterator[WsRawClient]:
    """A raw MQTT-over-WebSocket connection to `/mqtt` (subprotocol "mqtt"), the upgrade request with `headers`."""
    async with http.ws_connect(f"{base_url}/mqtt", protocols=["mqtt"], headers=headers) as ws:
        yield WsRawClient(ws)
