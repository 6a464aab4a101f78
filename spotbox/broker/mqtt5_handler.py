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
from amqtt.events import MQTTEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import OutgoingApplicationMessage

from spotbox.broker.handler import READ_WINDOW, Refusal
from spotbox.broker.mqtt5_connect import SESSION_EXPIRY, TOPIC_ALIAS_MAX, Mqtt5Client
from spotbox.broker.mqtt5_message import incoming_payload, outgoing_publish
from spotbox.broker.mqtt5_subscriptions import ClosedError, Mqtt5Subscriptions, Reason

if TYPE_CHECKING:
    from spotbox.broker.server import SpotboxBroker

logger = logging.getLogger(__name__)

# Room for a PUBLISH's fixed header (type byte and up to 4 remaining-length bytes) over the guard's body limit.
FIXED_HEADER_MAX = 5


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


class Mqtt5ProtocolHandler(Mqtt5Subscriptions):
    """spotbox's broker handler for one MQTT 5 connection."""

    def __init__(self, broker: SpotboxBroker, client: Mqtt5Client, **kwargs: Any) -> None:
        super().__init__(broker, **kwargs)
        self.client = client
        self._topic_aliases: dict[int, str] = {}
        # The client's Receive Maximum: QoS 1/2 PUBLISHes sent to it and not yet acknowledged [MQTT-3.3.4-9].
        self._send_quota = asyncio.Semaphore(client.receive_max)

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
        except ClosedError as exc:
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
            raise ClosedError(Reason.KEEP_ALIVE_TIMEOUT, "no packet within 1.5 times the keep alive") from None
        if not raw:
            return None
        try:
            packet, _ = mqtt5.read(memoryview(raw))
        except (ValueError, IndexError) as exc:
            raise ClosedError(Reason.MALFORMED_PACKET, str(exc)) from exc
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
            raise ClosedError(Reason.PROTOCOL_ERROR, f"unexpected {type(packet).__name__}")
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
                raise ClosedError(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} is over {TOPIC_ALIAS_MAX}")
            if topic:
                self._topic_aliases[alias] = topic
            elif (known := self._topic_aliases.get(alias)) is not None:
                topic = known
            else:
                raise ClosedError(Reason.PROTOCOL_ERROR, f"topic alias {alias} was never set")
        elif not topic:
            raise ClosedError(Reason.PROTOCOL_ERROR, "a PUBLISH without a topic name or topic alias")
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

    async def _client_disconnected(self, packet: mqtt5.DisconnectPacket) -> None:
        """A DISCONNECT from the client: its will is published only for reason code 0x04 [MQTT-3.14.4-3]."""
        assert self.session is not None
        expiry = packet.session_expiry_interval
        if expiry is not None:
            if self.session.attributes.get(SESSION_EXPIRY) == 0 and expiry != 0:
                raise ClosedError(Reason.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT")
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
