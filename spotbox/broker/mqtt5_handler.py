"""The protocol handler of an MQTT 5 client: spotbox's handler, reading and writing MQTT 5 through the `mqtt5` codec.

amqtt's broker drives it like any handler (subscriptions, deliveries through `mqtt_publish`, disconnection), and
spotbox's publish path (grant, validation, commit before the acknowledgement, backpressure) is the same as for
3.1.1. What differs is at the edges: packets are decoded by the codec and dispatched here; a received PUBLISH
becomes an amqtt `PublishPacket` whose payload carries its properties (see mqtt5_message); what amqtt sends is
encoded as MQTT 5 where the wire differs (PUBLISH, CONNACK, SUBACK, UNSUBACK, DISCONNECT). A plain PUBACK, PUBREC,
PUBREL, PUBCOMP or PINGRESP is the same bytes in both versions [MQTT-3.4.2.1], so those go out as amqtt writes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import mqtt5
from amqtt.errors import ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import Subscription, UnSubscription
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import OutgoingApplicationMessage

from spotbox.broker.handler import READ_WINDOW, Refusal, SpotboxProtocolHandler
from spotbox.broker.mqtt5_connect import SESSION_EXPIRY, TOPIC_ALIAS_MAX, Mqtt5Client
from spotbox.broker.mqtt5_message import incoming_payload, outgoing_publish
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
# Room for a PUBLISH's fixed header (type byte and up to 4 remaining-length bytes) over the guard's body limit.
FIXED_HEADER_MAX = 5
# Retain Handling of a subscription option [MQTT-3.8.3.1]: 0 sends retained messages on SUBSCRIBE, 1 only for a new
# subscription, 2 never.
RETAIN_IF_NEW, RETAIN_NEVER = 1, 2


class _ClosedError(Exception):
    """The connection must end: a DISCONNECT with this reason code is sent first."""

    def __init__(self, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _IdentifiedPublish(PublishPacket):
    """amqtt's PUBLISH, with the subscription identifiers it is delivered for [MQTT-3.3.4-3]."""

    __slots__ = ("subscription_ids",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.subscription_ids: list[int] = []


class _PropertiesKeepingMessage(OutgoingApplicationMessage):
    """amqtt's outgoing message, whose PUBLISH keeps the payload object (and so its MQTT 5 properties)."""

    __slots__ = ("subscription_ids",)

    def __init__(self, topic: str, qos: int | None, data: bytes | bytearray, retain: bool, ids: list[int]) -> None:
        super().__init__(None, topic, qos, data, retain)
        self.subscription_ids = ids

    def build_publish_packet(self, dup: bool = False) -> PublishPacket:
        """The PUBLISH amqtt's flows send (amqtt's own copies the payload into plain bytes)."""
        packet = PublishPacket.build(self.topic, self.data, self.packet_id, dup, self.qos, self.retain)
        identified = _IdentifiedPublish(packet.fixed_header, packet.variable_header, packet.payload)
        identified.subscription_ids = self.subscription_ids
        return identified


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


class Mqtt5ProtocolHandler(SpotboxProtocolHandler):
    """spotbox's broker handler for one MQTT 5 connection."""

    def __init__(self, broker: SpotboxBroker, client: Mqtt5Client, **kwargs: Any) -> None:
        super().__init__(broker, **kwargs)
        self.client = client
        self._topic_aliases: dict[int, str] = {}
        # The client's Receive Maximum: QoS 1/2 PUBLISHes sent to it and not yet acknowledged [MQTT-3.3.4-9].
        self._send_quota = asyncio.Semaphore(client.receive_max)
        # SUBSCRIBE packet id -> (its filters, the code decided before amqtt saw it, or None for amqtt's).
        self._subscribing: dict[int, tuple[list[str], list[int | None]]] = {}
        self._unsubscribing: dict[int, list[bool]] = {}
        # Filters just subscribed whose Retain Handling says no retained messages [MQTT-3.3.1-9, 3.3.1-10].
        self._no_retained: set[str] = set()

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        """CONNACK with what spotbox offers: amqtt calls this once the session is attached."""
        assert self.session is not None
        limits = self._broker.limits
        connack = mqtt5.ConnAckPacket(
            session_present=bool(self.session.parent),
            reason_code=mqtt5.ConnAckReasonCode.SUCCESS if authorize else mqtt5.ConnAckReasonCode.NOT_AUTHORIZED,
            assigned_client_id=self.client.assigned_client_id,
            server_keep_alive=self.client.keep_alive,
            # The reader pauses past READ_WINDOW unacknowledged publishes (handler.ReadGate): say so up front.
            receive_max=READ_WINDOW,
            topic_alias_max=TOPIC_ALIAS_MAX,
            max_packet_size=limits.max_packet + FIXED_HEADER_MAX,
            subscription_id_available=True,
            shared_subscription_available=True,
        )
        await self._write(connack.write())

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

    def _fits(self, data: bytes) -> bool:
        """True when the client's Maximum Packet Size allows `data` [MQTT-3.1.2-24]."""
        limit = self.client.max_packet_size
        return limit is None or len(data) <= limit

    async def _send_packet(self, packet: Any) -> None:
        if not isinstance(packet, PublishPacket):
            await super()._send_packet(packet)
            return
        assert packet.topic_name is not None
        publish = outgoing_publish(
            packet.topic_name,
            packet.data or b"",
            packet.qos or 0,
            packet.retain_flag,
            packet.packet_id,
            packet.dup_flag,
            getattr(packet, "subscription_ids", None),
        )
        if publish is not None:
            await self._write(publish.write())

    async def mqtt_publish(
        self,
        topic: str,
        data: bytes | bytearray,
        qos: int | None,
        retain: bool,
        ack_timeout: int | None = None,
        subscription_ids: list[int] | None = None,
    ) -> OutgoingApplicationMessage:
        """Deliver a message to this client, within its Receive Maximum, unless it expired or is too big for it.

        Routing names the subscription identifiers; amqtt's own deliveries (retained and queued messages) do not,
        and get those of every subscription of this client that matches the topic.
        """
        if subscription_ids is None:
            subscription_ids = self._matching_ids(topic)
        message = _PropertiesKeepingMessage(topic, qos, data, retain, subscription_ids)
        # Checked before a packet id is taken (any id: its size is the same).
        publish = outgoing_publish(topic, data, qos or 0, retain, 1 if qos else None, False, subscription_ids)
        if publish is None or not self._fits(publish.write()):
            # Expired, or over the client's limit: dropped as if delivered [MQTT-3.3.2-5, MQTT-3.1.2-25].
            logger.debug("message on %s not sent to %s: expired or too large", topic, self._client_id)
            return message
        if not qos:
            await self._handle_message_flow(message)
            return message
        assert self.session is not None
        async with self._send_quota:
            message.packet_id = self.session.next_packet_id
            if ack_timeout:
                await asyncio.wait_for(self._handle_message_flow(message), ack_timeout)
            else:
                await self._handle_message_flow(message)
        return message

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

    async def _reader_loop(self) -> None:
        """Read, decode and dispatch packets until the connection ends; then clean up as amqtt's loop does."""
        assert self.session is not None
        assert self._reader_ready is not None
        running: deque[asyncio.Task[None]] = deque()
        self._reader_ready.set()
        try:
            while True:
                while running and running[0].done():
                    running.popleft()
                if not await self._read_one(running):
                    break
        except _ClosedError as exc:
            logger.warning("mqtt 5 client %s disconnected: %s (%s)", self._client_id, exc.code.name, exc.reason)
            await self._disconnect(exc.code, exc.reason)
        except asyncio.CancelledError:
            logger.debug("reader of %s cancelled", self._client_id)
        except Exception:
            logger.exception("mqtt 5 reader of %s failed", self._client_id)
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _next_packet(self) -> mqtt5.Packet | None:
        """The next packet from the client, decoded; None once the connection has ended."""
        # The client must send something within 1.5 times the keep-alive [MQTT-3.1.2-22].
        try:
            async with asyncio.timeout(self.client.keep_alive * 1.5):
                raw = await self.reader.next_packet()
        except TimeoutError:
            raise _ClosedError(Reason.KEEP_ALIVE_TIMEOUT, "no packet within 1.5 times the keep alive") from None
        if not raw:
            return None
        try:
            packet, _ = mqtt5.read(memoryview(raw))
        except (ValueError, IndexError) as exc:
            raise _ClosedError(Reason.MALFORMED_PACKET, str(exc)) from exc
        return packet

    async def _read_one(self, running: deque[asyncio.Task[None]]) -> bool:
        """Read and dispatch one packet; False once the connection has ended."""
        packet = await self._next_packet()
        if packet is None:
            return False
        if isinstance(packet, mqtt5.PublishPacket):
            publish = self._incoming_publish(packet)
            # The ReadGate (handler.py) holds the reader here while this connection or the ingest queue is full.
            await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=publish, session=self.session)
            running.append(asyncio.create_task(self.handle_publish(publish), name="spotbox-mqtt5-publish"))
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._resolve(self._puback_waiters, packet.packet_id, packet)
        elif isinstance(packet, mqtt5.PubRecPacket):
            self._resolve(self._pubrec_waiters, packet.packet_id, packet)
        elif isinstance(packet, mqtt5.PubCompPacket):
            self._resolve(self._pubcomp_waiters, packet.packet_id, packet)
        elif isinstance(packet, mqtt5.PubRelPacket):
            if not self._resolve(self._pubrel_waiters, packet.packet_id, packet):
                code = mqtt5.PubCompReasonCode.PACKET_ID_NOT_FOUND
                await self._write(mqtt5.PubCompPacket(packet.packet_id, reason_code=code).write())
        elif isinstance(packet, mqtt5.SubscribePacket):
            await self._subscribe(packet)
        elif isinstance(packet, mqtt5.UnsubscribePacket):
            self._unsubscribe(packet)
        elif isinstance(packet, mqtt5.PingReqPacket):
            await self._write(mqtt5.PingRespPacket().write())
        elif isinstance(packet, mqtt5.DisconnectPacket):
            await self._client_disconnected(packet)
            return False
        else:
            # A second CONNECT [MQTT-3.1.0-2], AUTH without an authentication method [MQTT-4.12.0-1], or a packet only
            # a server sends.
            raise _ClosedError(Reason.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}")
        return True

    @staticmethod
    def _resolve(waiters: dict[int, asyncio.Future[Any]], packet_id: int, packet: Any) -> bool:
        """Hand an acknowledgement to amqtt's flow waiting for it; False when none waits."""
        waiter = waiters.get(packet_id)
        if waiter is None or waiter.done():
            return False
        waiter.set_result(packet)
        return True

    def _incoming_publish(self, packet: mqtt5.PublishPacket) -> PublishPacket:
        """amqtt's PUBLISH for a received one: its topic resolved through topic aliases, its properties kept."""
        topic, alias = packet.topic, packet.topic_alias
        if alias is not None:
            if not 0 < alias <= TOPIC_ALIAS_MAX:
                raise _ClosedError(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} is over {TOPIC_ALIAS_MAX}")
            if topic:
                self._topic_aliases[alias] = topic
            elif (known := self._topic_aliases.get(alias)) is not None:
                topic = known
            else:
                raise _ClosedError(Reason.PROTOCOL_ERROR, f"topic alias {alias} was never set")
        elif not topic:
            raise _ClosedError(Reason.PROTOCOL_ERROR, "a PUBLISH without a topic name or topic alias")
        payload = incoming_payload(packet)
        return PublishPacket.build(topic, payload, packet.packet_id, packet.duplicate, int(packet.qos), packet.retain)

    async def _refuse(self, publish_packet: PublishPacket, refusal: Refusal) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2) with the refusal's reason code and string; QoS 0 has no answer."""
        qos, packet_id = publish_packet.qos, publish_packet.packet_id
        if qos not in (QOS_1, QOS_2):
            return
        # Without Request Problem Information, reason strings are for CONNACK and DISCONNECT only [MQTT-3.1.2-29].
        reason = refusal.reason if self.client.request_problem_info else None
        for reason_str in (reason, None):
            if qos == QOS_1:
                ack = mqtt5.PubAckPacket(
                    packet_id, reason_code=mqtt5.PubAckReasonCode(refusal.reason_code), reason_str=reason_str
                ).write()
            else:
                ack = mqtt5.PubRecPacket(
                    packet_id, reason_code=mqtt5.PubRecReasonCode(refusal.reason_code), reason_str=reason_str
                ).write()
            # A reason string that would break the client's Maximum Packet Size is left out [MQTT-3.4.2-2].
            if self._fits(ack):
                await self._write(ack)
                return

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
            raise _ClosedError(Reason.PROTOCOL_ERROR, "No Local on a shared subscription")  # [MQTT-3.8.3-4]
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

    async def _client_disconnected(self, packet: mqtt5.DisconnectPacket) -> None:
        """A DISCONNECT from the client: its will is published only for reason code 0x04 [MQTT-3.14.4-3]."""
        assert self.session is not None
        expiry = packet.session_expiry_interval
        if expiry is not None:
            if self.session.attributes.get(SESSION_EXPIRY) == 0 and expiry != 0:
                raise _ClosedError(Reason.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT")
            self.session.attributes[SESSION_EXPIRY] = expiry
            self.session.clean_session = expiry == 0
        if packet.reason_code == Reason.DISCONNECT_WITH_WILL_MESSAGE:
            await self.handle_disconnect(None)  # amqtt publishes the will when no DISCONNECT packet was received
        else:
            await self.handle_disconnect(DisconnectPacket())

    async def _disconnect(self, code: Reason, reason: str) -> None:
        """Send DISCONNECT with a reason code; the caller then ends the connection (the will is published)."""
        packet = mqtt5.DisconnectPacket(reason_code=code, reason_str=reason).write()
        await self._write(packet if self._fits(packet) else mqtt5.DisconnectPacket(reason_code=code).write())
