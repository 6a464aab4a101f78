"""Both protocol versions on the wire, seen from the broker: one set of packets in, one set of encoders out.

MQTT 3.1.1 is decoded by `codec311`, MQTT 5 by the `mqtt5` package; each connection picks one `Wire` from its
CONNECT, and its reader loop then matches over the packet types below, whatever the version. A frame that is not
one valid packet raises `MalformedPacket` (never are its bytes read as further packets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mqtt5

from spotbox.mqtt import check5, codec311
from spotbox.mqtt.errors import IdentifierRejected, MalformedPacket, UnsupportedProtocol
from spotbox.mqtt.message import Message, Properties
from spotbox.mqtt.topics import valid_topic_name

MQTT_311 = 4
MQTT_5 = 5
_CODEC_ERRORS = (ValueError, IndexError, OverflowError, UnicodeDecodeError)
# User properties one PUBLISH (or will) may carry: each is encoded again for every subscriber, and 200,000 empty
# ones in a 1 MiB PUBLISH took 88 ms per subscriber (20 subscribers: 1.8 s of a blocked event loop per message).
# More is DISCONNECT 0x97 (quota exceeded); a will with more is refused as malformed (CONNACK 0x81).
USER_PROPERTIES_MAX = 100
# PUBACK/PUBREC reason strings are cut to this many characters: a reason names a field and a rule, not the value.
REASON_MAX_CHARS = 200


class ProtocolViolation(MalformedPacket):
    """A well-formed packet the protocol forbids here (MQTT 5: DISCONNECT 0x82 Protocol Error, then close)."""

    def __init__(self, reason: str, code: int = mqtt5.DisconnectReasonCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


# What the codec refuses that MQTT 5.0 calls a Protocol Error (0x82, or the code given), not a malformed packet: a
# property that may appear once appearing twice (2.2.2.2), a Receive Maximum or Maximum Packet Size of 0
# (3.1.2.11.3, 3.1.2.11.4), a PUBLISH with neither topic nor alias, and a Topic Alias of 0 (3.3.2.3.4).
_PROTOCOL_ERRORS = {
    "Duplicate value for unique property": (mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, None),
    "Receive maximum must be != 0": (mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, "Receive Maximum 0"),
    "Maximum packet size must be != 0": (mqtt5.DisconnectReasonCode.PROTOCOL_ERROR, "Maximum Packet Size 0"),
    "Topic alias must be set": (
        mqtt5.DisconnectReasonCode.PROTOCOL_ERROR,
        "a PUBLISH without a topic name or topic alias",
    ),
    "Topic alias must be != 0": (mqtt5.DisconnectReasonCode.TOPIC_ALIAS_INVALID, "topic alias 0"),
}


def _refusal(exc: Exception, what: str) -> MalformedPacket:
    """The codec's error as the standard classes it: a ProtocolViolation with its reason code, or malformed."""
    text = str(exc)
    for start, (code, reason) in _PROTOCOL_ERRORS.items():
        if text.startswith(start):
            return ProtocolViolation(reason or text, code)
    return MalformedPacket(f"{what}: {text}")


@dataclass(slots=True)
class Connect:
    """A CONNECT of either version, with MQTT 5's requests at their 3.1.1 meaning when absent."""

    version: int
    client_id: str
    clean_start: bool
    keep_alive: int
    username: str | None
    password: bytes | None
    will: Message | None
    will_delay_s: int = 0
    session_expiry_s: int = 0
    receive_max: int = 65535
    max_packet_size: int | None = None
    topic_alias_max: int = 0
    request_problem_info: bool = True
    authentication_method: str | None = None


@dataclass(slots=True)
class Publish:
    """A received PUBLISH; `topic` is already resolved through the connection's topic aliases."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    properties: Properties | None = None
    topic_alias: int | None = None


@dataclass(slots=True)
class Ack:
    """PUBACK, PUBREC, PUBREL or PUBCOMP from the client (`kind` is the packet type number)."""

    kind: int
    packet_id: int
    reason_code: int = 0


@dataclass(slots=True)
class TopicRequest:
    """One filter of a SUBSCRIBE, with its MQTT 5 options."""

    filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    """SUBSCRIBE of either version."""

    packet_id: int
    requests: list[TopicRequest]
    identifier: int | None = None


@dataclass(slots=True)
class Unsubscribe:
    """UNSUBSCRIBE of either version."""

    packet_id: int
    filters: list[str]


@dataclass(slots=True)
class PingReq:
    """PINGREQ."""


@dataclass(slots=True)
class Disconnect:
    """DISCONNECT; MQTT 5 may change the session expiry and ask for the will (0x04)."""

    reason_code: int = 0
    session_expiry_s: int | None = None


@dataclass(slots=True)
class Other:
    """A packet a client must not send after CONNECT (a second CONNECT, AUTH, server packets)."""

    name: str


Packet = Publish | Ack | Subscribe | Unsubscribe | PingReq | Disconnect | Other | Connect

_PINGREQ = PingReq()
PUBACK, PUBREC, PUBREL, PUBCOMP = codec311.PUBACK, codec311.PUBREC, codec311.PUBREL, codec311.PUBCOMP


def connect_version(body: bytes | memoryview) -> int:
    """The protocol level a CONNECT body asks for (4 or 5); UnsupportedProtocol or MalformedPacket otherwise."""
    level = codec311.connect_level(body)
    if level not in (MQTT_311, MQTT_5):
        raise UnsupportedProtocol(level)
    return level


def _properties(packet: mqtt5.PublishPacket | mqtt5.Will) -> Properties | None:
    if not (
        packet.payload_format_indicator
        or packet.message_expiry_interval is not None
        or packet.content_type is not None
        or packet.response_topic is not None
        or packet.correlation_data is not None
        or packet.user_properties
    ):
        return None
    return Properties(
        payload_format_indicator=packet.payload_format_indicator or None,
        message_expiry_interval=packet.message_expiry_interval,
        content_type=packet.content_type,
        response_topic=packet.response_topic,
        correlation_data=packet.correlation_data,
        user_properties=list(packet.user_properties),
    )


def decode_connect(version: int, frame: memoryview, header_len: int) -> Connect:
    """The CONNECT in `frame` (fixed header included); MalformedPacket / IdentifierRejected when it is not valid."""
    if version == MQTT_311:
        packet = codec311.decode(frame[0], frame[header_len:])
        assert isinstance(packet, codec311.Connect)
        will = None
        if packet.will is not None:
            if problem := valid_topic_name(packet.will.topic):
                raise MalformedPacket(f"will topic: {problem}")
            will = Message(packet.will.topic, packet.will.payload, packet.will.qos, packet.will.retain, None, 0.0)
        return Connect(
            MQTT_311,
            packet.client_id,
            packet.clean_session,
            packet.keep_alive,
            packet.username,
            packet.password,
            will,
            session_expiry_s=0 if packet.clean_session else 0xFFFFFFFF,
        )
    check5.connect(frame[header_len:])
    try:
        connect, used = _read5(frame)
    except _CODEC_ERRORS as exc:
        raise _refusal(exc, "malformed MQTT 5 CONNECT") from None
    if used != len(frame) or not isinstance(connect, mqtt5.ConnectPacket):
        raise MalformedPacket("malformed MQTT 5 CONNECT")
    will5 = None
    if connect.will is not None:
        if problem := valid_topic_name(connect.will.topic):
            raise MalformedPacket(f"will topic: {problem}")
        w = connect.will
        if len(w.user_properties) > USER_PROPERTIES_MAX:
            raise MalformedPacket(f"a will with more than {USER_PROPERTIES_MAX} user properties")
        will5 = Message(w.topic, w.payload or b"", int(w.qos), w.retain, _properties(w), 0.0)
    return Connect(
        MQTT_5,
        connect.client_id,
        connect.clean_start,
        connect.keep_alive,
        connect.username,
        connect.password,
        will5,
        will_delay_s=connect.will.will_delay_interval if connect.will is not None else 0,
        session_expiry_s=connect.session_expiry_interval,
        receive_max=connect.receive_max,
        max_packet_size=connect.max_packet_size,
        topic_alias_max=connect.topic_alias_max,
        request_problem_info=connect.request_problem_info,
        authentication_method=connect.authentication_method,
    )


def _read5(frame: memoryview) -> tuple[mqtt5.Packet, int]:
    """`mqtt5.read`, with a panic of the extension (a BaseException, not an Exception) as a ValueError: whatever
    `check5` does not catch ends one connection with one log line, never a task with a traceback."""
    try:
        return mqtt5.read(frame)
    except Exception:
        raise
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise ValueError(f"the mqtt5 codec panicked: {exc}") from None


def short_reason(reason: str | None) -> str | None:
    """A reason string cut to REASON_MAX_CHARS: it names the field and the rule, never repeats a whole value."""
    if reason is None or len(reason) <= REASON_MAX_CHARS:
        return reason
    return reason[: REASON_MAX_CHARS - 3] + "..."


class Wire311:
    """MQTT 3.1.1 through codec311."""

    version = MQTT_311

    def decode(self, frame: memoryview, header_len: int) -> Packet:  # noqa: PLR0911 - one return per packet type
        """One client packet after CONNECT."""
        first = frame[0]
        if first >> 4 == codec311.PUBLISH:  # most packets: straight into this module's Publish
            return Publish(*codec311.publish_fields(first, frame[header_len:]))
        packet = codec311.decode(first, frame[header_len:])
        match packet:
            case codec311.Publish():
                return Publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id)
            case codec311.PubAck() | codec311.PubRec() | codec311.PubRel() | codec311.PubComp():
                return Ack(frame[0] >> 4, packet.packet_id)
            case codec311.Subscribe():
                return Subscribe(packet.packet_id, [TopicRequest(f, q) for f, q in packet.topics])
            case codec311.Unsubscribe():
                return Unsubscribe(packet.packet_id, list(packet.filters))
            case codec311.PingReq():
                return _PINGREQ
            case codec311.Disconnect():
                return Disconnect()
            case _:
                return Other(type(packet).__name__)

    def connack(self, session_present: bool, code: int, **_: object) -> bytes:
        """CONNACK (3.1.1 return codes)."""
        return codec311.connack(session_present, code)

    def publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int | None,
        dup: bool,
        subscription_ids: list[int],
        topic_alias: int | None,
        send_topic: bool,
        now: float,
    ) -> bytes:
        """PUBLISH to a subscriber: the topic and payload only (3.1.1 has no properties)."""
        return codec311.publish(message.topic, message.payload, qos, retain, dup, packet_id)

    def ack(self, kind: int, packet_id: int, code: int = 0, reason: str | None = None) -> bytes:
        """PUBACK/PUBREC/PUBREL/PUBCOMP: 3.1.1 cannot say no, so the code and reason are not sent."""
        return _ACK_FIRST[kind] + packet_id.to_bytes(2, "big")

    def suback(self, packet_id: int, codes: list[int]) -> bytes:
        """SUBACK; any refusal is 0x80 in 3.1.1."""
        return codec311.suback(packet_id, [code if code < 0x80 else 0x80 for code in codes])

    def unsuback(self, packet_id: int, codes: list[int]) -> bytes:
        """UNSUBACK (3.1.1 has no per-filter codes)."""
        return codec311.unsuback(packet_id)

    def pingresp(self) -> bytes:
        """PINGRESP."""
        return b"\xd0\x00"

    def disconnect(self, code: int, reason: str | None = None) -> bytes:
        """Nothing: a 3.1.1 server never sends DISCONNECT; it closes the connection."""
        return b""


_ACK_FIRST = {PUBACK: b"\x40\x02", PUBREC: b"\x50\x02", PUBREL: b"\x62\x02", PUBCOMP: b"\x70\x02"}
_ACKS_5 = {
    PUBACK: (mqtt5.PubAckPacket, mqtt5.PubAckReasonCode),
    PUBREC: (mqtt5.PubRecPacket, mqtt5.PubRecReasonCode),
    PUBREL: (mqtt5.PubRelPacket, mqtt5.PubRelReasonCode),
    PUBCOMP: (mqtt5.PubCompPacket, mqtt5.PubCompReasonCode),
}


@dataclass(slots=True)
class Wire5:
    """MQTT 5 through the `mqtt5` codec, within what the client asked for in its CONNECT."""

    max_packet_size: int | None = None
    request_problem_info: bool = True
    topic_alias_max: int = 0
    # Topic aliases the client set towards spotbox [MQTT-3.3.2-12]; their number is bounded by ours.
    incoming_aliases: dict[int, str] = field(default_factory=dict)
    incoming_alias_max: int = 0
    version: int = MQTT_5

    def decode(self, frame: memoryview, header_len: int) -> Packet:  # noqa: PLR0911 - one return per packet type
        """One client packet after CONNECT; MalformedPacket for anything the codec or the standard refuses."""
        check5.check(frame, header_len)
        try:
            packet, used = _read5(frame)
        except _CODEC_ERRORS as exc:
            raise _refusal(exc, "malformed packet") from None
        if used != len(frame):
            raise MalformedPacket("packet shorter than its remaining length")
        match packet:
            case mqtt5.PublishPacket():
                return self._publish(packet)
            case mqtt5.PubAckPacket() | mqtt5.PubRecPacket() | mqtt5.PubRelPacket() | mqtt5.PubCompPacket():
                return Ack(frame[0] >> 4, packet.packet_id, int(packet.reason_code))
            case mqtt5.SubscribePacket():
                requests = [
                    TopicRequest(f.pattern, int(f.max_qos), f.no_local, f.retain_as_published, int(f.retain_handling))
                    for f in packet.topic_filters
                ]
                return Subscribe(packet.packet_id, requests, packet.subscription_id)
            case mqtt5.UnsubscribePacket():
                return Unsubscribe(packet.packet_id, list(packet.patterns))
            case mqtt5.PingReqPacket():
                return _PINGREQ
            case mqtt5.DisconnectPacket():
                return Disconnect(int(packet.reason_code), packet.session_expiry_interval)
            case _:
                return Other(type(packet).__name__)

    def _publish(self, packet: mqtt5.PublishPacket) -> Publish:
        topic, alias = packet.topic, packet.topic_alias
        if alias is not None:
            if not 0 < alias <= self.incoming_alias_max:
                raise ProtocolViolation(
                    f"topic alias {alias} is over {self.incoming_alias_max}",
                    mqtt5.DisconnectReasonCode.TOPIC_ALIAS_INVALID,
                )
            if topic:
                self.incoming_aliases[alias] = topic
            elif (known := self.incoming_aliases.get(alias)) is not None:
                topic = known
            else:
                raise ProtocolViolation(f"topic alias {alias} was never set")
        if problem := valid_topic_name(topic):
            raise ProtocolViolation(f"PUBLISH {problem}", mqtt5.DisconnectReasonCode.TOPIC_NAME_INVALID)
        if packet.subscription_ids:
            raise ProtocolViolation("a PUBLISH from a client carries a subscription identifier")  # [MQTT-3.3.4-6]
        if len(packet.user_properties) > USER_PROPERTIES_MAX:
            raise ProtocolViolation(
                f"a PUBLISH with more than {USER_PROPERTIES_MAX} user properties",
                mqtt5.DisconnectReasonCode.QUOTA_EXCEEDED,
            )
        return Publish(
            topic,
            packet.payload,
            int(packet.qos),
            packet.retain,
            packet.duplicate,
            packet.packet_id,
            _properties(packet),
        )

    def _fits(self, data: bytes) -> bool:
        return self.max_packet_size is None or len(data) <= self.max_packet_size

    def connack(self, session_present: bool, code: int, **properties: object) -> bytes:
        """CONNACK with what spotbox offers (`properties` are ConnAckPacket arguments)."""
        return mqtt5.ConnAckPacket(
            session_present=session_present and code == 0,
            reason_code=mqtt5.ConnAckReasonCode(code),
            **properties,  # type: ignore[arg-type]
        ).write()

    def publish(
        self,
        message: Message,
        qos: int,
        retain: bool,
        packet_id: int | None,
        dup: bool,
        subscription_ids: list[int],
        topic_alias: int | None,
        send_topic: bool,
        now: float,
    ) -> bytes:
        """PUBLISH to a subscriber, with the message's properties (its expiry counted down [MQTT-3.3.2-6])."""
        props = message.properties
        topic = message.topic if send_topic else ""
        if props is None:
            return mqtt5.PublishPacket(
                topic,
                message.payload,
                qos=mqtt5.QoS(qos),
                retain=retain,
                packet_id=packet_id,
                duplicate=dup,
                subscription_ids=subscription_ids,
                topic_alias=topic_alias,
            ).write()
        return mqtt5.PublishPacket(
            topic,
            message.payload,
            qos=mqtt5.QoS(qos),
            retain=retain,
            packet_id=packet_id,
            duplicate=dup,
            payload_format_indicator=props.payload_format_indicator or 0,
            message_expiry_interval=message.remaining_expiry(now),
            content_type=props.content_type,
            response_topic=props.response_topic,
            correlation_data=props.correlation_data,
            subscription_ids=subscription_ids,
            topic_alias=topic_alias,
            user_properties=props.user_properties,
        ).write()

    def ack(self, kind: int, packet_id: int, code: int = 0, reason: str | None = None) -> bytes:
        """PUBACK/PUBREC/PUBREL/PUBCOMP with a reason code; the reason string only if the client wants it and it
        fits its Maximum Packet Size [MQTT-3.1.2-29, MQTT-3.4.2-2]."""
        if code == 0:
            return _ACK_FIRST[kind] + packet_id.to_bytes(2, "big")
        packet_type, codes = _ACKS_5[kind]
        if reason is not None and self.request_problem_info:
            data: bytes = packet_type(packet_id, reason_code=codes(code), reason_str=short_reason(reason)).write()
            if self._fits(data):
                return data
        plain: bytes = packet_type(packet_id, reason_code=codes(code)).write()
        return plain

    def suback(self, packet_id: int, codes: list[int]) -> bytes:
        """SUBACK with a reason code per filter."""
        return mqtt5.SubAckPacket(packet_id, [mqtt5.SubAckReasonCode(code) for code in codes]).write()

    def unsuback(self, packet_id: int, codes: list[int]) -> bytes:
        """UNSUBACK with a reason code per filter (0x00 or 0x11 no subscription existed)."""
        return mqtt5.UnsubAckPacket(packet_id, [mqtt5.UnsubAckReasonCode(code) for code in codes]).write()

    def pingresp(self) -> bytes:
        """PINGRESP."""
        return b"\xd0\x00"

    def disconnect(self, code: int, reason: str | None = None) -> bytes:
        """DISCONNECT with a reason code (and string, when it fits the client's limit)."""
        if reason is not None:
            data = mqtt5.DisconnectPacket(
                reason_code=mqtt5.DisconnectReasonCode(int(code)), reason_str=short_reason(reason)
            ).write()
            if self._fits(data):
                return data
        return mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode(int(code))).write()


Wire = Wire311 | Wire5


def now() -> float:
    """The clock messages are stamped with (expiry is counted on it)."""
    return time.monotonic()


__all__ = ["IdentifierRejected", "MalformedPacket", "UnsupportedProtocol"]
