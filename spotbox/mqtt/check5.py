"""What the `mqtt5` codec lets through and MQTT 5.0 forbids: checked on the raw bytes before it decodes a packet.

The codec (a Rust extension) panics on a string that is not UTF-8 (a surrogate, an overlong form), which surfaces
as a BaseException per packet; and it accepts U+0000 in strings, packet identifier 0, DUP at QoS 0, SUBSCRIBE and
UNSUBSCRIBE without filters, reserved bits of subscription options and of the CONNECT flags, Authentication Data
without a method, and a Response Topic with wildcards (which it then refuses to encode for a subscriber). Each of
these is a Malformed Packet or a Protocol Error by the standard, so `check` raises on it and the connection ends.

A PUBLISH without properties, the common case, costs one topic decode here (about 0.3 µs).
"""

from __future__ import annotations

from spotbox.mqtt.codec311 import field_span
from spotbox.mqtt.errors import MalformedPacket
from spotbox.mqtt.topics import valid_topic_name

# Property identifier -> how its value is encoded (MQTT 5.0 2.2.2.2).
_BYTE, _TWO, _FOUR, _VARINT, _STRING, _BINARY, _PAIR = range(7)
_PROPERTY_KINDS = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _STRING, 0x08: _STRING, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR,
    0x12: _STRING, 0x13: _TWO, 0x15: _STRING, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE,
    0x1A: _STRING, 0x1C: _STRING, 0x1F: _STRING, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE,
    0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
_FIXED = {_BYTE: 1, _TWO: 2, _FOUR: 4}
_PAYLOAD_FORMAT, _RESPONSE_TOPIC, _AUTH_METHOD, _AUTH_DATA = 0x01, 0x08, 0x15, 0x16


def check(frame: memoryview, header_len: int) -> None:
    """Raise MalformedPacket when the MQTT 5 packet in `frame` breaks a rule the codec does not check."""
    kind = frame[0] >> 4
    if kind == 3:
        publish(frame, header_len)
        return
    body = frame[header_len:]
    if kind in (4, 5, 6, 7):
        _ack(body)
    elif kind in (8, 10):
        _subscribe(body, subscribe=kind == 8)
    elif kind in (14, 15):
        if len(body) > 1:
            _properties(body, 1)
    elif kind == 1:
        connect(body)


def publish(frame: memoryview, header_len: int) -> None:
    """A PUBLISH, the hot path: checked on `frame` itself, without copies."""
    first = frame[0]
    size = len(frame)
    pos, end = field_span(frame, header_len, "topic name")
    try:
        str(frame[pos:end], "utf-8")  # U+0000 in a topic is refused after decoding (valid_topic_name)
    except UnicodeDecodeError:
        raise MalformedPacket("topic name is not valid UTF-8") from None
    if first & 0x06:
        if end + 2 > size:
            raise MalformedPacket("PUBLISH packet identifier overruns the packet")
        if not frame[end] | frame[end + 1]:
            raise MalformedPacket("PUBLISH with packet identifier 0")  # [MQTT-2.2.1-3]
        end += 2
    elif first & 0x08:
        raise MalformedPacket("PUBLISH with DUP set at QoS 0")  # [MQTT-3.3.1-2]
    if end < size and frame[end]:  # a property block that is not empty
        _properties(frame[header_len:], end - header_len)


def connect(body: memoryview) -> None:
    """A CONNECT body (protocol name and level already read by `connect_level`)."""
    pos = 2 + (body[0] << 8 | body[1]) + 1
    if pos + 3 > len(body):
        raise MalformedPacket("CONNECT variable header overruns the packet")
    flags = body[pos]
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")  # [MQTT-3.1.2-3]
    if not flags & 0x04 and flags & 0x38:
        raise MalformedPacket("CONNECT Will QoS or Will Retain set without the Will Flag")  # [MQTT-3.1.2-11, -13]
    pos, found = _properties(body, pos + 3)
    if _AUTH_DATA in found and _AUTH_METHOD not in found:
        raise MalformedPacket("CONNECT Authentication Data without an Authentication Method")  # 3.1.2.11.10
    pos = _string(body, pos, "client identifier")
    if flags & 0x04:
        pos, _ = _properties(body, pos)
        pos = _string(body, pos, "will topic")
        pos = _skip_binary(body, pos, "will payload")
    if flags & 0x80:
        pos = _string(body, pos, "user name")


def _ack(body: memoryview) -> None:
    if len(body) >= 2 and not body[0] | body[1]:
        raise MalformedPacket("acknowledgement with packet identifier 0")  # [MQTT-2.2.1-3]
    if len(body) > 3:
        _properties(body, 3)


def _subscribe(body: memoryview, *, subscribe: bool) -> None:
    name = "SUBSCRIBE" if subscribe else "UNSUBSCRIBE"
    if len(body) < 2 or not body[0] | body[1]:
        raise MalformedPacket(f"{name} with packet identifier 0")  # [MQTT-2.2.1-3]
    pos, _ = _properties(body, 2)
    filters = 0
    while pos < len(body):
        pos = _string(body, pos, "topic filter")
        if subscribe:
            if pos >= len(body):
                raise MalformedPacket("SUBSCRIBE topic filter without its options")
            if body[pos] & 0xC0:
                raise MalformedPacket("SUBSCRIBE options with reserved bits set")  # [MQTT-3.8.3-5]
            pos += 1
        filters += 1
    if not filters:
        raise MalformedPacket(f"{name} without a topic filter")  # [MQTT-3.8.3-2] [MQTT-3.10.3-2]


def _properties(body: memoryview, pos: int) -> tuple[int, set[int]]:
    """Walk a property block at `pos`: (position after it, the identifiers of the properties it holds)."""
    length, pos = _varint(body, pos)
    end = pos + length
    if end > len(body):
        raise MalformedPacket("properties overrun the packet")
    found: set[int] = set()
    while pos < end:
        ident = body[pos]
        kind = _PROPERTY_KINDS.get(ident)
        if kind is None:
            raise MalformedPacket(f"unknown property {ident:#04x}")
        pos += 1
        found.add(ident)
        if kind in _FIXED:
            if ident == _PAYLOAD_FORMAT and pos < end and body[pos] > 1:
                raise MalformedPacket("Payload Format Indicator is neither 0 nor 1")  # 3.3.2.3.2
            pos += _FIXED[kind]
        elif kind == _VARINT:
            _, pos = _varint(body, pos)
        elif kind == _BINARY:
            pos = _skip_binary(body, pos, "binary property")
        elif ident == _RESPONSE_TOPIC:
            start = pos
            pos = _string(body, pos, "Response Topic")
            if problem := valid_topic_name(bytes(body[start + 2 : pos]).decode()):
                raise MalformedPacket(f"Response Topic: {problem}")  # [MQTT-3.3.2-14]
        else:
            pos = _string(body, pos, "property")
            if kind == _PAIR:
                pos = _string(body, pos, "property")
    if pos != end:
        raise MalformedPacket("properties overrun their length")
    return pos, found


def _string(body: memoryview, pos: int, what: str) -> int:
    """Check the UTF-8 string at `pos` (well-formed, no U+0000 [MQTT-1.5.4-1] [MQTT-1.5.4-2]); the position after."""
    start, end = field_span(body, pos, what)
    raw = bytes(body[start:end])
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError:
            raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if b"\0" in raw:
        raise MalformedPacket(f"{what} contains U+0000")
    return end


def _skip_binary(body: memoryview, pos: int, what: str) -> int:
    return field_span(body, pos, what)[1]


def _varint(body: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= len(body):
            raise MalformedPacket("variable byte integer overruns the packet")
        byte = body[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise MalformedPacket("variable byte integer longer than four bytes")
