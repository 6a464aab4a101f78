"""The fixed header shared by MQTT 3.1.1 and 5.0: type and flags byte, then the remaining length.

The connection reads the header first, so a packet over the size limit is refused before its body is read.
"""

from __future__ import annotations

from spotbox.mqtt.errors import MalformedPacket

__all__ = ["MAX_REMAINING_LENGTH", "MalformedPacket", "encode_length", "fixed_header", "frame"]

# The largest remaining length four bytes can encode (268,435,455): [MQTT-2.2.3] / MQTT 5 1.5.5.
MAX_REMAINING_LENGTH = 0x0FFFFFFF


def fixed_header(buf: bytearray | bytes | memoryview, start: int = 0) -> tuple[int, int, int] | None:
    """(first byte, remaining length, header length) of the packet at `start`, or None when more bytes are needed."""
    available = len(buf) - start
    if available < 2:
        return None
    byte = buf[start + 1]
    if byte < 0x80:  # almost every packet: a length under 128 in one byte
        return buf[start], byte, 2
    length = byte & 0x7F
    if available > 2 and buf[start + 2] < 0x80:  # two length bytes: packets up to 16 KiB
        return buf[start], length | buf[start + 2] << 7, 3
    for index in range(2, 5):
        if available <= index:
            return None
        byte = buf[start + index]
        length |= (byte & 0x7F) << (7 * (index - 1))
        if byte < 0x80:
            return buf[start], length, index + 1
    # A fifth length byte: the remaining length is at most four bytes long, so this is no MQTT packet.
    raise MalformedPacket("remaining length longer than four bytes")


def encode_length(n: int) -> bytes:
    """The variable-length encoding of a remaining length, in the fewest bytes [MQTT-1.5.5-1]."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} is over {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while n:
        n, digit = divmod(n, 128)
        out.append(digit | 0x80 if n else digit)
    return bytes(out)


def frame(first_byte: int, body: bytes) -> bytes:
    """A whole packet: the fixed header (`first_byte` and the length of `body`), then `body`."""
    return _FIRST[first_byte] + encode_length(len(body)) + body


_ONE_BYTE = [bytes((n,)) for n in range(0x80)]
_FIRST = [bytes((n,)) for n in range(0x100)]
