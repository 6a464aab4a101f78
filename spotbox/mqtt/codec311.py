"""MQTT 3.1.1 packets: decode what clients send, encode what both sides send (OASIS MQTT 3.1.1, 2014).

The connection frames packets itself (`spotbox.mqtt.framing`) and hands `decode` one whole packet: its first
byte and its body. Anything the standard calls malformed or a protocol violation raises `MalformedPacket`, and
no byte is ever skipped: a bad packet ends the connection, so nothing hidden in it is read as further packets.
MQTT 5 packets are the `mqtt5` package's; `connect_level` tells which codec a CONNECT needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from spotbox.mqtt.errors import IdentifierRejected, MalformedPacket, UnsupportedProtocol
from spotbox.mqtt.framing import encode_length
from spotbox.mqtt.topics import valid_topic_filter, valid_topic_name

# Re-exported: the errors decode raises (names defined below are public as usual).
__all__ = ["IdentifierRejected", "MalformedPacket", "UnsupportedProtocol"]

PROTOCOL_LEVEL = 4
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (3.2.2.3).
ACCEPTED, UNACCEPTABLE_PROTOCOL, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE = 0, 1, 2, 3
BAD_CREDENTIALS, NOT_AUTHORIZED = 4, 5
SUBACK_FAILURE = 0x80


@dataclass(slots=True, frozen=True)
class Will:
    """The will message of a CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(slots=True, frozen=True)
class Connect:
    """CONNECT (3.1)."""

    client_id: str
    clean_session: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None


# Not frozen: it is built once per message on the hot path, and a frozen dataclass's __init__ costs more.
@dataclass(slots=True)
class Publish:
    """PUBLISH (3.3); `packet_id` is None exactly when `qos` is 0."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(slots=True, frozen=True)
class PubAck:
    """PUBACK (3.4)."""

    packet_id: int


@dataclass(slots=True, frozen=True)
class PubRec:
    """PUBREC (3.5)."""

    packet_id: int


@dataclass(slots=True, frozen=True)
class PubRel:
    """PUBREL (3.6)."""

    packet_id: int


@dataclass(slots=True, frozen=True)
class PubComp:
    """PUBCOMP (3.7)."""

    packet_id: int


@dataclass(slots=True, frozen=True)
class Subscribe:
    """SUBSCRIBE (3.8): (topic filter, requested QoS) pairs in the order sent."""

    packet_id: int
    topics: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class Unsubscribe:
    """UNSUBSCRIBE (3.10)."""

    packet_id: int
    filters: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class PingReq:
    """PINGREQ (3.12)."""


@dataclass(slots=True, frozen=True)
class Disconnect:
    """DISCONNECT (3.14)."""


@dataclass(slots=True, frozen=True)
class ConnAck:
    """CONNACK (3.2), as a client receives it."""

    session_present: bool
    code: int


@dataclass(slots=True, frozen=True)
class SubAck:
    """SUBACK (3.9), as a client receives it: one code per filter (granted QoS or 0x80)."""

    packet_id: int
    codes: list[int] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class UnsubAck:
    """UNSUBACK (3.11), as a client receives it."""

    packet_id: int


@dataclass(slots=True, frozen=True)
class PingResp:
    """PINGRESP (3.13), as a client receives it."""


ClientPacket = Connect | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | Unsubscribe | PingReq | Disconnect
ServerPacket = ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | SubAck | UnsubAck | PingResp
Packet = ClientPacket | ServerPacket

PINGREQ_PACKET = PingReq()
DISCONNECT_PACKET = Disconnect()
PINGRESP_PACKET = PingResp()


# --- decoding --------------------------------------------------------------------------------------------------


def decode(first_byte: int, body: bytes | memoryview) -> ClientPacket:
    """The packet a client sent: `first_byte` (type and flags) and its whole `body`.

    Raises MalformedPacket, UnsupportedProtocol (CONNECT of another protocol level) or IdentifierRejected.
    """
    kind = first_byte >> 4
    if kind == PUBLISH:
        return _publish(first_byte, body)
    decoder = _FROM_CLIENT.get(kind)
    if decoder is None:
        raise MalformedPacket(f"packet type {kind} is never sent by a client")
    return decoder(first_byte, body)


def decode_client(first_byte: int, body: bytes | memoryview) -> ServerPacket:
    """The packet a server sent, as a client (tests, bench) reads it; raises MalformedPacket."""
    kind = first_byte >> 4
    if kind == PUBLISH:
        return _publish(first_byte, body)
    decoder = _FROM_SERVER.get(kind)
    if decoder is None:
        raise MalformedPacket(f"packet type {kind} is never sent by a server")
    return decoder(first_byte, body)


def connect_level(body: bytes | memoryview) -> int:
    """The protocol level of a CONNECT body (4: MQTT 3.1.1, 5: MQTT 5.0), to pick the codec that decodes it.

    Raises MalformedPacket when the protocol name is not "MQTT" (or "MQIsdp" at level 3) [MQTT-3.1.2-1].
    """
    name, pos = _string(body, 0, "protocol name")
    if pos >= len(body):
        raise MalformedPacket("CONNECT without a protocol level")
    level = body[pos]
    # MQTT 3.1 (level 3) was named "MQIsdp": answered as an unsupported level, not as garbage.
    if name != "MQTT" and (name, level) != ("MQIsdp", 3):
        raise MalformedPacket("CONNECT protocol name is not MQTT")
    return level


def _publish(first_byte: int, body: bytes | memoryview) -> Publish:
    return Publish(*publish_fields(first_byte, body))


def publish_fields(first_byte: int, body: bytes | memoryview) -> tuple[str, bytes, int, bool, bool, int | None]:
    """A PUBLISH's topic, payload, QoS, retain, DUP and packet id, in Publish's order (for a broker's own Publish
    type without building this module's first); raises MalformedPacket."""
    qos = (first_byte >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    dup = first_byte & 0x08
    if dup and not qos:
        raise MalformedPacket("PUBLISH with DUP set at QoS 0")  # [MQTT-3.3.1-2]
    size = len(body)
    if size < 2:
        raise MalformedPacket("PUBLISH without a topic name")
    end = 2 + (body[0] << 8 | body[1])
    if end > size:
        raise MalformedPacket("PUBLISH topic name overruns the packet")
    try:
        topic = str(body[2:end], "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic name is not valid UTF-8") from None  # [MQTT-1.5.3-1]
    if not topic:
        raise MalformedPacket("PUBLISH with an empty topic name")  # [MQTT-4.7.3-1]
    if "+" in topic or "#" in topic:
        raise MalformedPacket("PUBLISH topic name contains a wildcard")  # [MQTT-3.3.2-2]
    if "\0" in topic:
        raise MalformedPacket("PUBLISH topic name contains U+0000")  # [MQTT-1.5.3-2]
    packet_id = None
    if qos:
        if end + 2 > size:
            raise MalformedPacket("PUBLISH packet identifier overruns the packet")
        packet_id = body[end] << 8 | body[end + 1]
        if not packet_id:
            raise MalformedPacket("PUBLISH with packet identifier 0")  # [MQTT-2.3.1-1]
        end += 2
    return topic, bytes(body[end:]), qos, bool(first_byte & 0x01), bool(dup), packet_id


def _string(body: bytes | memoryview, pos: int, what: str) -> tuple[str, int]:
    """A UTF-8 string field at `pos`: (text, position after it)."""
    raw, end = _binary(body, pos, what)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None  # [MQTT-1.5.3-1]
    if "\0" in text:
        raise MalformedPacket(f"{what} contains U+0000")  # [MQTT-1.5.3-2]
    return text, end


def field_span(body: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    """Where the two-byte-length field at `pos` starts and ends; MalformedPacket if it overruns the packet."""
    start = pos + 2
    if start > len(body):
        raise MalformedPacket(f"{what} overruns the packet")
    end = start + (body[pos] << 8 | body[pos + 1])
    if end > len(body):
        raise MalformedPacket(f"{what} overruns the packet")
    return start, end


def _binary(body: bytes | memoryview, pos: int, what: str) -> tuple[bytes, int]:
    """A two-byte-length binary field at `pos`: (bytes, position after it)."""
    start, end = field_span(body, pos, what)
    return bytes(body[start:end]), end


def _packet_id(body: bytes | memoryview, name: str) -> int:
    if len(body) < 2:
        raise MalformedPacket(f"{name} without a packet identifier")
    packet_id = body[0] << 8 | body[1]
    if not packet_id:
        raise MalformedPacket(f"{name} with packet identifier 0")  # [MQTT-2.3.1-1]
    return packet_id


def _check_flags(first_byte: int, expected: int, name: str) -> None:
    if first_byte & 0x0F != expected:
        # [MQTT-2.2.2-1] [MQTT-2.2.2-2]; for PUBREL [MQTT-3.6.1-1], SUBSCRIBE [MQTT-3.8.1-1],
        # UNSUBSCRIBE [MQTT-3.10.1-1]
        raise MalformedPacket(f"{name} with reserved flags {first_byte & 0x0F:#06b}, not {expected:#06b}")


def _connect(first_byte: int, body: bytes | memoryview) -> Connect:
    _check_flags(first_byte, 0, "CONNECT")
    level = connect_level(body)
    if level != PROTOCOL_LEVEL:
        raise UnsupportedProtocol(level)  # [MQTT-3.1.2-2]
    if len(body) < 10:
        raise MalformedPacket("CONNECT variable header overruns the packet")
    name_end = 6  # "\x00\x04MQTT": connect_level accepts no other name at level 4
    flags = body[name_end + 1]
    keep_alive = body[name_end + 2] << 8 | body[name_end + 3]
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")  # [MQTT-3.1.2-3]
    has_will, will_qos, will_retain = flags & 0x04, (flags >> 3) & 3, bool(flags & 0x20)
    if will_qos == 3:
        raise MalformedPacket("CONNECT will QoS 3")  # [MQTT-3.1.2-14]
    if not has_will and (will_qos or will_retain):
        raise MalformedPacket("CONNECT will QoS or retain without a will")  # [MQTT-3.1.2-13] [MQTT-3.1.2-15]
    has_username, has_password = flags & 0x80, flags & 0x40
    if has_password and not has_username:
        raise MalformedPacket("CONNECT password without a user name")  # [MQTT-3.1.2-22]
    client_id, pos = _string(body, 10, "client identifier")  # [MQTT-3.1.3-4]
    will = None
    if has_will:
        will_topic, pos = _string(body, pos, "will topic")  # [MQTT-3.1.3-10]
        if problem := valid_topic_name(will_topic):
            raise MalformedPacket(f"will topic: {problem}")  # [MQTT-4.7.1-1] [MQTT-4.7.3-1]
        will_payload, pos = _binary(body, pos, "will message")
        will = Will(will_topic, will_payload, will_qos, will_retain)
    username = password = None
    if has_username:
        username, pos = _string(body, pos, "user name")  # [MQTT-3.1.3-11]
    if has_password:
        password, pos = _binary(body, pos, "password")
    if pos != len(body):
        raise MalformedPacket("CONNECT has bytes after its payload")
    clean_session = bool(flags & 0x02)
    if not client_id and not clean_session:
        raise IdentifierRejected("empty client identifier without a clean session")  # [MQTT-3.1.3-8]
    return Connect(client_id, clean_session, keep_alive, username, password, will)


def _subscribe(first_byte: int, body: bytes | memoryview) -> Subscribe:
    _check_flags(first_byte, 0b0010, "SUBSCRIBE")
    packet_id = _packet_id(body, "SUBSCRIBE")
    topics: list[tuple[str, int]] = []
    pos, size = 2, len(body)
    while pos < size:
        topic_filter, pos = _string(body, pos, "topic filter")  # [MQTT-3.8.3-1]
        if pos >= size:
            raise MalformedPacket("SUBSCRIBE topic filter without a requested QoS")
        requested = body[pos]
        pos += 1
        if requested > 2:
            raise MalformedPacket("SUBSCRIBE requested QoS above 2 or reserved bits set")  # [MQTT-3-8.3-4]
        if problem := valid_topic_filter(topic_filter):
            raise MalformedPacket(f"SUBSCRIBE {problem}")
        topics.append((topic_filter, requested))
    if not topics:
        raise MalformedPacket("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return Subscribe(packet_id, topics)


def _unsubscribe(first_byte: int, body: bytes | memoryview) -> Unsubscribe:
    _check_flags(first_byte, 0b0010, "UNSUBSCRIBE")
    packet_id = _packet_id(body, "UNSUBSCRIBE")
    filters: list[str] = []
    pos, size = 2, len(body)
    while pos < size:
        topic_filter, pos = _string(body, pos, "topic filter")  # [MQTT-3.10.3-1]
        if problem := valid_topic_filter(topic_filter):
            raise MalformedPacket(f"UNSUBSCRIBE {problem}")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    return Unsubscribe(packet_id, filters)


_Ack = TypeVar("_Ack", PubAck, PubRec, PubRel, PubComp, UnsubAck)
_P = TypeVar("_P")
_Decoder = Callable[[int, bytes | memoryview], _P]


def _ack_decoder(kind: type[_Ack], flags: int, name: str) -> _Decoder[_Ack]:
    """A decoder for a packet that is only a packet identifier."""

    def decode_ack(first_byte: int, body: bytes | memoryview) -> _Ack:
        _check_flags(first_byte, flags, name)
        if len(body) != 2:
            raise MalformedPacket(f"{name} remaining length {len(body)}, not 2")
        return kind(_packet_id(body, name))

    return decode_ack


def _empty_decoder(packet: _P, name: str) -> _Decoder[_P]:
    """A decoder for a packet without a body (PINGREQ, PINGRESP, DISCONNECT)."""

    def decode_empty(first_byte: int, body: bytes | memoryview) -> _P:
        _check_flags(first_byte, 0, name)
        if body:
            raise MalformedPacket(f"{name} with a body")
        return packet

    return decode_empty


def _connack(first_byte: int, body: bytes | memoryview) -> ConnAck:
    _check_flags(first_byte, 0, "CONNACK")
    if len(body) != 2 or body[0] > 1:
        raise MalformedPacket("CONNACK is not two bytes with flags 0 or 1")  # [MQTT-3.2.2-1]
    if body[0] and body[1]:
        raise MalformedPacket("CONNACK with session present and a refusal")  # [MQTT-3.2.2-4]
    return ConnAck(bool(body[0]), body[1])


def _suback(first_byte: int, body: bytes | memoryview) -> SubAck:
    _check_flags(first_byte, 0, "SUBACK")
    packet_id = _packet_id(body, "SUBACK")
    codes = list(bytes(body[2:]))
    if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
        raise MalformedPacket("SUBACK without return codes or with a reserved one")  # [MQTT-3.9.3-2]
    return SubAck(packet_id, codes)


_FROM_CLIENT: dict[int, _Decoder[ClientPacket]] = {
    CONNECT: _connect,
    PUBACK: _ack_decoder(PubAck, 0, "PUBACK"),
    PUBREC: _ack_decoder(PubRec, 0, "PUBREC"),
    PUBREL: _ack_decoder(PubRel, 0b0010, "PUBREL"),
    PUBCOMP: _ack_decoder(PubComp, 0, "PUBCOMP"),
    SUBSCRIBE: _subscribe,
    UNSUBSCRIBE: _unsubscribe,
    PINGREQ: _empty_decoder(PINGREQ_PACKET, "PINGREQ"),
    DISCONNECT: _empty_decoder(DISCONNECT_PACKET, "DISCONNECT"),
}
_FROM_SERVER: dict[int, _Decoder[ServerPacket]] = {
    CONNACK: _connack,
    PUBACK: _FROM_CLIENT[PUBACK],  # type: ignore[dict-item]
    PUBREC: _FROM_CLIENT[PUBREC],  # type: ignore[dict-item]
    PUBREL: _FROM_CLIENT[PUBREL],  # type: ignore[dict-item]
    PUBCOMP: _FROM_CLIENT[PUBCOMP],  # type: ignore[dict-item]
    SUBACK: _suback,
    UNSUBACK: _ack_decoder(UnsubAck, 0, "UNSUBACK"),
    PINGRESP: _empty_decoder(PINGRESP_PACKET, "PINGRESP"),
}


# --- encoding --------------------------------------------------------------------------------------------------


def encode_string(text: str | bytes) -> bytes:
    """A string field: two-byte length, then the UTF-8 bytes (bytes are taken as they are, so tests can send
    invalid ones)."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > 0xFFFF:
        raise ValueError(f"string field of {len(raw)} bytes is over 65,535")
    return len(raw).to_bytes(2, "big") + raw


def publish(
    topic: str | bytes,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
) -> bytes:
    """PUBLISH; `packet_id` is required at QoS 1 and 2 and ignored at QoS 0."""
    raw = topic.encode() if isinstance(topic, str) else topic
    if qos:
        if not packet_id:
            raise ValueError("a QoS 1 or 2 PUBLISH needs a packet identifier from 1 to 65535")
        head = len(raw).to_bytes(2, "big") + raw + packet_id.to_bytes(2, "big")
    else:
        head = len(raw).to_bytes(2, "big") + raw
    first = 0x30 | dup << 3 | qos << 1 | retain
    return b"".join((_BYTE[first], encode_length(len(head) + len(payload)), head, payload))


def connack(session_present: bool, code: int) -> bytes:
    """CONNACK; session present is sent only with return code 0 [MQTT-3.2.2-4]."""
    return bytes((0x20, 2, 1 if session_present and not code else 0, code))


def puback(packet_id: int) -> bytes:
    """PUBACK."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def pubrec(packet_id: int) -> bytes:
    """PUBREC."""
    return b"\x50\x02" + packet_id.to_bytes(2, "big")


def pubrel(packet_id: int) -> bytes:
    """PUBREL (fixed header flags 0b0010 [MQTT-3.6.1-1])."""
    return b"\x62\x02" + packet_id.to_bytes(2, "big")


def pubcomp(packet_id: int) -> bytes:
    """PUBCOMP."""
    return b"\x70\x02" + packet_id.to_bytes(2, "big")


def suback(packet_id: int, codes: list[int]) -> bytes:
    """SUBACK: one return code per filter, in the order requested [MQTT-3.8.4-5]."""
    body = packet_id.to_bytes(2, "big") + bytes(codes)
    return b"\x90" + encode_length(len(body)) + body


def unsuback(packet_id: int) -> bytes:
    """UNSUBACK."""
    return b"\xb0\x02" + packet_id.to_bytes(2, "big")


def pingreq() -> bytes:
    """PINGREQ."""
    return b"\xc0\x00"


def pingresp() -> bytes:
    """PINGRESP."""
    return b"\xd0\x00"


def disconnect() -> bytes:
    """DISCONNECT."""
    return b"\xe0\x00"


def connect(
    client_id: str | bytes,
    *,
    clean_session: bool = True,
    keep_alive: int = 60,
    username: str | bytes | None = None,
    password: str | bytes | None = None,
    will: Will | None = None,
) -> bytes:
    """CONNECT at protocol level 4."""
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    parts = [encode_string("MQTT"), bytes((PROTOCOL_LEVEL,)), b"", keep_alive.to_bytes(2, "big")]
    parts.append(encode_string(client_id))
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        parts += (encode_string(will.topic), encode_string(will.payload))
    parts += [encode_string(field) for field in (username, password) if field is not None]
    parts[2] = bytes((flags,))
    body = b"".join(parts)
    return b"\x10" + encode_length(len(body)) + body


def subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (fixed header flags 0b0010 [MQTT-3.8.1-1])."""
    body = packet_id.to_bytes(2, "big") + b"".join(encode_string(f) + bytes((qos,)) for f, qos in topics)
    return b"\x82" + encode_length(len(body)) + body


def unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    """UNSUBSCRIBE (fixed header flags 0b0010 [MQTT-3.10.1-1])."""
    body = packet_id.to_bytes(2, "big") + b"".join(encode_string(f) for f in filters)
    return b"\xa2" + encode_length(len(body)) + body


def encode(packet: Packet) -> bytes:  # noqa: PLR0911, PLR0912 - one case per packet type
    """Any packet of this module as bytes on the wire."""
    match packet:
        case Publish(topic, payload, qos, retain, dup, packet_id):
            return publish(topic, payload, qos, retain, dup, packet_id)
        case Connect(client_id, clean_session, keep_alive, username, password, will):
            return connect(
                client_id,
                clean_session=clean_session,
                keep_alive=keep_alive,
                username=username,
                password=password,
                will=will,
            )
        case PubAck(packet_id):
            return puback(packet_id)
        case PubRec(packet_id):
            return pubrec(packet_id)
        case PubRel(packet_id):
            return pubrel(packet_id)
        case PubComp(packet_id):
            return pubcomp(packet_id)
        case Subscribe(packet_id, topics):
            return subscribe(packet_id, topics)
        case Unsubscribe(packet_id, filters):
            return unsubscribe(packet_id, filters)
        case ConnAck(session_present, code):
            return connack(session_present, code)
        case SubAck(packet_id, codes):
            return suback(packet_id, codes)
        case UnsubAck(packet_id):
            return unsuback(packet_id)
        case PingReq():
            return pingreq()
        case PingResp():
            return pingresp()
        case Disconnect():
            return disconnect()
    raise TypeError(f"not an MQTT 3.1.1 packet: {packet!r}")


_BYTE = [bytes((n,)) for n in range(0x100)]
