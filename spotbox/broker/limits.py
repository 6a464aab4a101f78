"""MQTT input limits, enforced as bytes arrive: a packet over the limits is refused from its header, unread.

amqtt reads a packet by asking its reader for the fixed header, then for as many bytes as the header announces.
`PacketGuard` sits between amqtt and the connection: it reads each packet itself, checks the announced size
before reading the body (for a PUBLISH big enough to break --max-payload, its topic length too, so that the
payload size is exact), checks a PUBLISH topic (length, UTF-8, no U+0000), and only then hands the bytes on.
A refused packet ends the connection with one log line giving the reason; amqtt sees the end of the stream
and cleans up as usual.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter

logger = logging.getLogger(__name__)

_PUBLISH = 3
_MAX_REMAINING_LENGTH_BYTES = 4  # [MQTT-2.2.3]: remaining length takes at most 4 bytes


@dataclass(frozen=True)
class MqttLimits:
    """How big an MQTT packet, topic and crowd of clients spotbox accepts."""

    max_payload: int = 1024 * 1024
    max_topic_length: int = 1024
    max_connections: int = 1000

    @property
    def max_packet(self) -> int:
        """The largest remaining length of any packet: a PUBLISH with the largest topic and payload."""
        return self.max_payload + self.max_topic_length + 4


def _topic_too_long(topic_length: int, limits: MqttLimits) -> str:
    return f"a topic of {topic_length} bytes is over --max-topic-length {limits.max_topic_length}"


class _RefusedError(Exception):
    """A packet breaks a limit or the protocol; the connection ends."""


class PacketGuard(ReaderAdapter):
    """A reader that passes on whole MQTT packets, each checked against the limits before its body is read."""

    def __init__(self, inner: ReaderAdapter, limits: MqttLimits, peer: str) -> None:
        self._inner = inner
        self._limits = limits
        self._peer = peer
        self._buffer = bytearray()
        self._eof = False

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (what is buffered for -1); fewer only once the stream has ended or was refused."""
        while not self._eof and len(self._buffer) < max(n, 1):
            await self._fill()
        size = len(self._buffer) if n < 0 else min(n, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def peek_packet(self) -> bytes:
        """The next whole packet, left in place for the next reads (empty at the end of the stream)."""
        if not self._buffer and not self._eof:
            await self._fill()
        return bytes(self._buffer)

    async def next_packet(self) -> bytes:
        """The next whole packet, taken (empty at the end of the stream or after a refused packet)."""
        if not self._buffer and not self._eof:
            await self._fill()
            if self._eof:
                self._buffer.clear()  # a packet cut short by the end of the stream
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    async def _fill(self) -> None:
        try:
            self._buffer += await self._next_packet()
        except _RefusedError as exc:
            logger.warning("mqtt connection from %s closed: %s", self._peer, exc)
            self._eof = True

    def feed_eof(self) -> None:
        """Mark the end of stream."""
        self._eof = True
        self._inner.feed_eof()

    async def _exactly(self, n: int) -> bytes:
        """`n` bytes from the connection; fewer means it ended (and the guard passes on what came)."""
        if n <= 0:
            return b""
        try:
            data: bytes = await self._inner.read(n)
        except asyncio.IncompleteReadError as exc:
            data = exc.partial
        except (ConnectionError, OSError):
            data = b""
        if len(data) < n:
            self._eof = True
        return data

    async def _next_packet(self) -> bytes:
        # Two reads for most packets: the type and first length byte, then the whole body.
        header = bytearray(await self._exactly(2))
        if self._eof:
            return bytes(header)
        length, shift = header[1] & 0x7F, 7
        while header[-1] & 0x80:
            if len(header) > _MAX_REMAINING_LENGTH_BYTES:
                raise _RefusedError("malformed remaining length in a fixed header")
            byte = await self._exactly(1)
            if not byte:
                return bytes(header)
            header += byte
            length |= (byte[0] & 0x7F) << shift
            shift += 7
        if header[0] >> 4 == _PUBLISH:
            return bytes(header) + await self._publish_body(header[0], length)
        if length > self._limits.max_packet:
            limit = self._limits.max_packet
            raise _RefusedError(f"a packet of {length} bytes is over the limit of {limit} (--max-payload)")
        return bytes(header) + await self._exactly(length)

    async def _publish_body(self, first: int, length: int) -> bytes:
        """A PUBLISH body; its payload size is checked before the payload is read, its topic once read."""
        limits = self._limits
        if length > limits.max_payload:
            # Only a packet this big can carry a payload over the limit: its topic length tells exactly.
            body = await self._exactly(2)
            if self._eof:
                return body
            topic_length = int.from_bytes(body, "big")
            payload_length = length - 2 - topic_length - (2 if first & 0x06 else 0)
            if topic_length > limits.max_topic_length:
                raise _RefusedError(_topic_too_long(topic_length, limits))
            if payload_length > limits.max_payload:
                raise _RefusedError(
                    f"a PUBLISH payload of {payload_length} bytes is over --max-payload {limits.max_payload}"
                )
            body += await self._exactly(length - 2)
        else:
            body = await self._exactly(length)
        if self._eof:
            return body
        topic_length = int.from_bytes(body[:2], "big")
        if topic_length > limits.max_topic_length:
            raise _RefusedError(_topic_too_long(topic_length, limits))
        if 2 + topic_length > length:
            raise _RefusedError("malformed PUBLISH: its remaining length is shorter than its topic")
        try:
            topic = body[2 : 2 + topic_length].decode()
        except UnicodeDecodeError:
            raise _RefusedError("a PUBLISH topic is not valid UTF-8 [MQTT-1.5.3-1]") from None
        if "\0" in topic:
            raise _RefusedError("a PUBLISH topic contains U+0000 [MQTT-1.5.3-2]")
        return body
