"""The subscriptions of an MQTT 5 connection: SUBSCRIBE with its options and identifier, SUBACK and UNSUBACK codes.

amqtt adds and removes the subscriptions (its subscription queues, served by the broker's client loop); this part
of the MQTT 5 handler decides what amqtt is not told (shared subscriptions without a group are invalid), keeps each
filter's options on the session for routing (mqtt5_routing), and answers in MQTT 5 reason codes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import mqtt5
from amqtt.errors import ProtocolHandlerError
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription

from spotbox.broker.handler import SpotboxProtocolHandler
from spotbox.broker.mqtt5_routing import (
    OPTIONS,
    SHARE_PREFIX,
    SubscriptionOptions,
    shared_filter,
    subscription_options,
    valid_shared,
)

if TYPE_CHECKING:
    from spotbox.broker.server import SpotboxBroker

logger = logging.getLogger(__name__)

Reason = mqtt5.DisconnectReasonCode
# amqtt's SUBACK code for any refused filter; MQTT 5 tells an invalid filter from a denied one.
_AMQTT_REFUSED = 0x80
# Retain Handling of a subscription option [MQTT-3.8.3.1]: 0 sends retained messages on SUBSCRIBE, 1 only for a new
# subscription, 2 never.
RETAIN_IF_NEW, RETAIN_NEVER = 1, 2


class ClosedError(Exception):
    """The connection must end: a DISCONNECT with this reason code is sent first."""

    def __init__(self, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def valid_filter(pattern: str) -> bool:
    """True when `#` is only a whole last level and `+` only whole levels [MQTT-4.7.1-1, 4.7.1-2]."""
    levels = pattern.split("/")
    return all(
        ("#" not in level or (level == "#" and index == len(levels) - 1)) and ("+" not in level or level == "+")
        for index, level in enumerate(levels)
    )


def suback_code(pattern: str, code: int) -> mqtt5.SubAckReasonCode:
    """The MQTT 5 SUBACK code for a filter: amqtt's refusal (0x80) becomes 0x8F (invalid) or 0x87 (denied)."""
    if code != _AMQTT_REFUSED:
        return mqtt5.SubAckReasonCode(code)
    if valid_filter(pattern) and (not pattern.startswith(SHARE_PREFIX) or valid_shared(pattern)):
        return mqtt5.SubAckReasonCode.NOT_AUTHORIZED
    return mqtt5.SubAckReasonCode.TOPIC_FILTER_INVALID


class Mqtt5Subscriptions(SpotboxProtocolHandler):
    """The subscription side of spotbox's MQTT 5 handler (Mqtt5ProtocolHandler), and its packet writer."""

    def __init__(self, broker: SpotboxBroker, **kwargs: Any) -> None:
        super().__init__(broker, **kwargs)
        # SUBSCRIBE packet id -> (its filters, the code decided before amqtt saw it, or None for amqtt's).
        self._subscribing: dict[int, tuple[list[str], list[int | None]]] = {}
        self._unsubscribing: dict[int, list[bool]] = {}
        # Filters just subscribed whose Retain Handling says no retained messages [MQTT-3.3.1-9, 3.3.1-10].
        self._no_retained: set[str] = set()

    async def _write(self, data: bytes) -> None:
        """Send encoded packets, as amqtt's `_send_packet` does (same lock, same handling of a lost connection)."""
        try:
            if self.writer is not None:
                async with self._write_lock:
                    self.writer.write(data)
                    await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            await self.handle_connection_closed()
        except asyncio.CancelledError as exc:
            raise ProtocolHandlerError("Packet handling was cancelled") from exc

    def _matching_ids(self, topic: str) -> list[int]:
        """The subscription identifiers of this client's subscriptions that match `topic`."""
        assert self.session is not None
        options = subscription_options(self.session) or {}
        return [
            option.subscription_id
            for pattern, option in options.items()
            if option.subscription_id is not None
            and shared_filter(pattern) is None
            and self._broker._matches(topic, pattern)
        ]

    def takes_retained(self, pattern: str) -> bool:
        """Whether the subscription to `pattern` just made gets the retained messages (its Retain Handling)."""
        if pattern in self._no_retained:
            self._no_retained.discard(pattern)
            return False
        return True

    @property
    def _client_id(self) -> str | None:
        return self.session.client_id if self.session is not None else None

    async def _subscribe(self, packet: mqtt5.SubscribePacket) -> None:
        """Pass the filters spotbox serves to amqtt's subscription queue; SUBACK follows once amqtt has added them."""
        assert self.session is not None
        patterns = [topic_filter.pattern for topic_filter in packet.topic_filters]
        codes: list[int | None] = [
            _AMQTT_REFUSED if pattern.startswith(SHARE_PREFIX) and not valid_shared(pattern) else None
            for pattern in patterns
        ]
        served = [
            (topic_filter.pattern, int(topic_filter.max_qos))
            for topic_filter, code in zip(packet.topic_filters, codes, strict=True)
            if code is None
        ]
        options = self.session.attributes.setdefault(OPTIONS, {})
        for topic_filter, code in zip(packet.topic_filters, codes, strict=True):
            if code is None:
                self._note_options(options, topic_filter, packet.subscription_id)
        self._subscribing[packet.packet_id] = (patterns, codes)
        if served:
            self._pending_subscriptions.put_nowait(Subscription(packet.packet_id, served))
        else:
            await self.mqtt_acknowledge_subscription(packet.packet_id, [])

    def _note_options(
        self, options: dict[str, SubscriptionOptions], topic_filter: mqtt5.TopicFilter, subscription_id: int | None
    ) -> None:
        """Keep a filter's options for routing, and note whether its Retain Handling wants retained messages."""
        pattern = topic_filter.pattern
        shared = shared_filter(pattern) is not None
        if shared and topic_filter.no_local:
            raise ClosedError(Reason.PROTOCOL_ERROR, "No Local on a shared subscription")  # [MQTT-3.8.3-4]
        handling = int(topic_filter.retain_handling)
        existed = any(
            session.client_id == self._client_id for session, _ in self._broker.subscriptions.get(pattern, ())
        )
        if handling == RETAIN_NEVER or (handling == RETAIN_IF_NEW and existed):
            self._no_retained.add(pattern)
        options[pattern] = SubscriptionOptions(
            no_local=topic_filter.no_local,
            retain_as_published=topic_filter.retain_as_published,
            subscription_id=subscription_id,
        )

    async def mqtt_acknowledge_subscription(self, packet_id: int, return_codes: list[int]) -> None:
        """SUBACK: amqtt's granted QoS per filter, its refusals told apart (0x8F invalid, 0x87 not authorized)."""
        patterns, codes = self._subscribing.pop(packet_id, ([], []))
        granted = iter(return_codes)
        reason_codes = [
            suback_code(pattern, next(granted) if code is None else code)
            for pattern, code in zip(patterns, codes, strict=True)
        ]
        # A refused filter has no subscription, so no options either (its identifier must not show up).
        options = subscription_options(self.session) if self.session is not None else None
        for pattern, reason_code in zip(patterns, reason_codes, strict=True):
            if options is not None and int(reason_code) >= _AMQTT_REFUSED:
                options.pop(pattern, None)
        await self._write(mqtt5.SubAckPacket(packet_id, reason_codes).write())

    def _unsubscribe(self, packet: mqtt5.UnsubscribePacket) -> None:
        """Note which filters this client had (UNSUBACK says so per filter), then queue it for amqtt."""
        subscriptions = self._broker.subscriptions
        client_id = self._client_id
        self._unsubscribing[packet.packet_id] = [
            any(session.client_id == client_id for session, _ in subscriptions.get(pattern, ()))
            for pattern in packet.patterns
        ]
        options = subscription_options(self.session) if self.session is not None else None
        for pattern in packet.patterns:
            if options is not None:
                options.pop(pattern, None)
        self._pending_unsubscriptions.put_nowait(UnSubscription(packet.packet_id, packet.patterns))

    async def mqtt_acknowledge_unsubscription(self, packet_id: int) -> None:
        """UNSUBACK with a reason code per filter: success, or no subscription existed."""
        existed = self._unsubscribing.pop(packet_id, [])
        codes = [
            mqtt5.UnsubAckReasonCode.SUCCESS if had else mqtt5.UnsubAckReasonCode.NO_SUBSCRIPTION_EXISTED
            for had in existed
        ]
        await self._write(mqtt5.UnsubAckPacket(packet_id, codes).write())
