"""One application message as the broker carries it: topic, payload, QoS, retain and the MQTT 5 properties."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class Properties:
    """The MQTT 5 PUBLISH properties forwarded unaltered to subscribers [MQTT-3.3.2-4] [MQTT-3.3.2-15]
    [MQTT-3.3.2-16] [MQTT-3.3.2-20] [MQTT-3.3.2-17] [MQTT-3.3.2-18].

    Subscription identifiers and topic aliases belong to one delivery or one connection, so they are not here.
    """

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    # Kept in the order received: the server forwards user properties in that order [MQTT-3.3.2-18].
    user_properties: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Message:
    """An application message; `created` is time.monotonic() at receipt, the start of its expiry interval."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    created: float

    def expired(self, now: float) -> bool:
        """True once the Message Expiry Interval has passed: the server must not deliver it [MQTT-3.3.2-5]."""
        interval = self.properties.message_expiry_interval if self.properties else None
        return interval is not None and now - self.created >= interval

    def remaining_expiry(self, now: float) -> int | None:
        """The expiry interval to send onwards: what was received minus the whole seconds waited [MQTT-3.3.2-6].

        None when the message never expires; at least 1 while the message has not expired, 0 once it has.
        """
        interval = self.properties.message_expiry_interval if self.properties else None
        if interval is None:
            return None
        return min(interval, max(0, interval - math.floor(now - self.created)))


def footprint(message: Message) -> int:
    """The bytes a message holds beyond its objects: payload, topic and MQTT 5 properties (each user property
    counts USER_PROPERTY_BYTES more, a tuple of two strings), for the budgets of what spotbox keeps."""
    size = len(message.payload) + len(message.topic)
    props = message.properties
    if props is not None:
        size += len(props.content_type or "") + len(props.response_topic or "") + len(props.correlation_data or b"")
        size += sum(len(key) + len(value) + USER_PROPERTY_BYTES for key, value in props.user_properties)
    return size


# What one user property costs beyond its text: a tuple of two strings, about 150 bytes.
USER_PROPERTY_BYTES = 150
