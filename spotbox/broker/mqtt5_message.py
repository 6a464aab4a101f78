"""An MQTT 5 application message as amqtt's broker core carries it: a payload that knows its PUBLISH properties.

amqtt routes, retains and queues a message as `(topic, data, qos)`: its broadcast queue, retained store and offline
session queues keep `data` as the object they were given. A payload that is a `bytes` subclass carrying the
PUBLISH properties therefore travels through all of them unchanged: MQTT 3.1.1 subscribers are written its bytes,
MQTT 5 subscribers also get its properties. A message without properties stays plain `bytes`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import mqtt5


@dataclass(slots=True, frozen=True)
class PublishProperties:
    """The PUBLISH properties a broker forwards [MQTT-3.3.2], and when the message arrived (for its expiry)."""

    payload_format_indicator: int = 0
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    received_at: float = 0.0

    def remaining_expiry(self) -> int | None:
        """Seconds the message still lives (None: no expiry); 0 or less once it has expired [MQTT-3.3.2-5]."""
        if self.message_expiry_interval is None:
            return None
        return self.message_expiry_interval - int(time.monotonic() - self.received_at)


class V5Payload(bytes):
    """Payload bytes with the MQTT 5 properties of the PUBLISH that brought them."""

    properties: PublishProperties


def incoming_payload(packet: mqtt5.PublishPacket | mqtt5.Will) -> bytes:
    """The payload of a received PUBLISH (or will) as it is routed: with its properties when it has any."""
    data = packet.payload or b""
    if not (
        packet.payload_format_indicator
        or packet.message_expiry_interval is not None
        or packet.content_type is not None
        or packet.response_topic is not None
        or packet.correlation_data is not None
        or packet.user_properties
    ):
        return data
    payload = V5Payload(data)
    payload.properties = PublishProperties(
        payload_format_indicator=packet.payload_format_indicator,
        message_expiry_interval=packet.message_expiry_interval,
        content_type=packet.content_type,
        response_topic=packet.response_topic,
        correlation_data=packet.correlation_data,
        user_properties=tuple(packet.user_properties),
        received_at=time.monotonic(),
    )
    return payload


def properties_of(data: bytes | bytearray) -> PublishProperties | None:
    """The MQTT 5 properties a routed payload carries, if any."""
    return data.properties if isinstance(data, V5Payload) else None


def outgoing_publish(
    topic: str,
    data: bytes | bytearray,
    qos: int,
    retain: bool,
    packet_id: int | None,
    dup: bool,
    subscription_ids: list[int] | None = None,
) -> mqtt5.PublishPacket | None:
    """The MQTT 5 PUBLISH for a subscriber, with the message's properties; None once the message has expired."""
    properties = properties_of(data)
    carried: dict[str, Any] = {}
    if properties is not None:
        expiry = properties.remaining_expiry()
        if expiry is not None and expiry <= 0:
            return None
        carried = {
            "payload_format_indicator": properties.payload_format_indicator,
            # The receiver is told the time the message has left, not the time it was given [MQTT-3.3.2-6].
            "message_expiry_interval": expiry,
            "content_type": properties.content_type,
            "response_topic": properties.response_topic,
            "correlation_data": properties.correlation_data,
            "user_properties": list(properties.user_properties),
        }
    return mqtt5.PublishPacket(
        topic,
        bytes(data),
        qos=mqtt5.QoS(qos),
        retain=retain,
        packet_id=packet_id,
        duplicate=dup,
        subscription_ids=subscription_ids or [],
        **carried,
    )
