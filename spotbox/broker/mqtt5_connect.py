"""MQTT 5 CONNECT and CONNACK, decoded and encoded by the `mqtt5` codec (see docs/mqtt5.md).

amqtt reads a CONNECT itself and answers protocol level 5 with "unacceptable protocol version". `SpotboxBroker`
peeks at the first packet (PacketGuard has framed it) and, for level 5, reads it here instead: the login is checked
with the same plugins as for 3.1.1, a refusal gets its MQTT 5 reason code, and an accepted client gets an amqtt
`Session` and an `Mqtt5ProtocolHandler`, which amqtt's broker then drives like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mqtt5
from amqtt.adapters import WriterAdapter
from amqtt.errors import MQTTError
from amqtt.session import Session

from spotbox.broker.mqtt5_message import incoming_payload
from spotbox.broker.mqtt5_routing import OPTIONS

logger = logging.getLogger(__name__)

MQTT_5 = 5
# Topic aliases a client may use towards spotbox [MQTT-3.2.2.3.8]; each costs one dict entry per connection.
TOPIC_ALIAS_MAX = 32
# Longest keep-alive spotbox accepts; a client asking for more, or for none, is told this one [MQTT-3.2.2-21].
MAX_KEEP_ALIVE_S = 3600
# Session Expiry Interval that means "never" [MQTT-3.1.2.11.2].
NEVER_EXPIRES = 0xFFFFFFFF


def is_mqtt5_connect(raw: bytes) -> bool:
    """True when a whole first packet is a CONNECT with protocol name "MQTT" and level 5."""
    if not raw or raw[0] != 0x10:
        return False
    end = 1  # past the remaining length: its last byte has the top bit clear
    while end < len(raw) and raw[end] & 0x80:
        end += 1
    return raw[end + 1 : end + 8] == b"\x00\x04MQTT\x05"


@dataclass(frozen=True)
class Mqtt5Client:
    """What an MQTT 5 client asked for in its CONNECT, and what spotbox answered, for its protocol handler."""

    receive_max: int
    max_packet_size: int | None
    request_problem_info: bool
    session_expiry_interval: int
    keep_alive: int
    assigned_client_id: str | None


def decode_connect(raw: bytes) -> mqtt5.ConnectPacket:
    """The CONNECT of `raw`; MQTTError (after which the connection is refused as malformed) when it is not one."""
    try:
        packet, _ = mqtt5.read(memoryview(raw))
    except (ValueError, IndexError) as exc:
        raise MQTTError(f"malformed MQTT 5 CONNECT: {exc}") from exc
    if not isinstance(packet, mqtt5.ConnectPacket):
        raise MQTTError("the first packet is not a CONNECT")
    return packet


async def refuse(writer: WriterAdapter, code: mqtt5.ConnAckReasonCode, reason: str) -> MQTTError:
    """Send CONNACK with a failure reason code and close; the returned error is for the caller to raise."""
    try:
        writer.write(mqtt5.ConnAckPacket(reason_code=code, reason_str=reason).write())
        await writer.drain()
        await writer.close()
    except (ConnectionError, RuntimeError) as exc:
        logger.debug("CONNACK %s not sent: %r", code.name, exc)
    return MQTTError(f"MQTT 5 connection refused, {code.name}: {reason}")


def password_text(connect: mqtt5.ConnectPacket) -> str | None:
    """The password as the users file checks it (text); MQTTError-free: undecodable bytes never match a password."""
    if connect.password is None:
        return None
    return connect.password.decode("utf-8", errors="replace")


def client_of(connect: mqtt5.ConnectPacket, assigned_client_id: str | None) -> Mqtt5Client:
    """What the handler must respect for this client, with the keep-alive spotbox grants."""
    keep_alive = connect.keep_alive if 0 < connect.keep_alive <= MAX_KEEP_ALIVE_S else MAX_KEEP_ALIVE_S
    return Mqtt5Client(
        receive_max=connect.receive_max,
        max_packet_size=connect.max_packet_size,
        request_problem_info=connect.request_problem_info,
        session_expiry_interval=connect.session_expiry_interval,
        keep_alive=keep_alive,
        assigned_client_id=assigned_client_id,
    )


def fill_session(session: Session, connect: mqtt5.ConnectPacket, client: Mqtt5Client) -> None:
    """Set what this CONNECT says on an amqtt session, new or resumed."""
    # amqtt keeps a disconnected session (and queues QoS 1/2 messages for it) unless it is "clean": in MQTT 5 terms,
    # a session whose expiry interval is 0 ends with its connection [MQTT-3.1.2-23].
    session.clean_session = connect.session_expiry_interval == 0
    will = connect.will
    session.will_flag = will is not None
    session.will_topic = will.topic if will is not None else None
    session.will_message = incoming_payload(will) if will is not None else None
    session.will_qos = int(will.qos) if will is not None else 0
    session.will_retain = will.retain if will is not None else False
    session.username = connect.username
    session.password = password_text(connect)
    session.keep_alive = client.keep_alive
    session.attributes[SESSION_EXPIRY] = connect.session_expiry_interval
    session.attributes[WILL_DELAY] = will.will_delay_interval if will is not None else 0
    session.attributes.setdefault(OPTIONS, {})


# Session attribute: the Session Expiry Interval of an MQTT 5 session, in seconds.
SESSION_EXPIRY = "spotbox.session_expiry"
# Session attribute: the Will Delay Interval of an MQTT 5 session's will, in seconds.
WILL_DELAY = "spotbox.will_delay"
