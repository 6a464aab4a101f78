"""The per-connection protocol handler: validation and durable storage happen here, before any acknowledgement.

amqtt acknowledges a QoS 1/2 PUBLISH in the handler before the broker or any plugin sees it, and plugin hooks
cannot veto a message (see docs/design.md). So spotbox's hook is the handler's `handle_publish`, the task amqtt
starts for each received PUBLISH: a status is validated and committed first; only then does amqtt's own flow
acknowledge it and queue it for routing. A rejected status, and any publish the user is not granted (checked
first, on every topic), is acknowledged as its protocol allows but wrapped in `RejectedMessage`, which
`SpotboxBroker` never routes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from amqtt.broker import BrokerContext
from amqtt.errors import ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.plugins.manager import PluginManager
from amqtt.session import IncomingApplicationMessage

from spotbox.broker.auth import may_publish
from spotbox.errors import StorageError
from spotbox.status import Delivery, payload_digest, status_topic_serial
from spotbox.validation import Rejection

if TYPE_CHECKING:
    from spotbox.broker.server import SpotboxBroker

logger = logging.getLogger(__name__)

REJECTED_TOPIC = "spotbox/rejected/{serial}"


class _Outcome(enum.Enum):
    STORED = enum.auto()
    NOT_STORED = enum.auto()
    OTHER_TOPIC = enum.auto()


# MQTT 5 reason codes of a refused PUBLISH (a 3.1.1 publisher cannot be told; it gets the plain acknowledgement).
NOT_AUTHORIZED = 0x87
PAYLOAD_FORMAT_INVALID = 0x99


@dataclass(slots=True, frozen=True)
class Refusal:
    """Why a publish is acknowledged but never routed, stored or streamed: a reason code and a reason string."""

    reason_code: int
    reason: str


class RejectedMessage(IncomingApplicationMessage):
    """An invalid status: acknowledged per protocol, never routed, stored or streamed."""

    __slots__ = ()


# PUBACK: packet type 4, remaining length 2 (then the packet id).
PUBACK_HEADER = b"\x40\x02"

# Session attribute: packet id -> (payload digest, first receive time) of recent QoS 1/2 statuses without a timestamp.
# Packet ids are reused once acknowledged, so only the last few matter: those a client may still resend.
_UNSTAMPED = "spotbox.unstamped"
_UNSTAMPED_MAX = 256
# How long a receive time is kept for resends. A resend comes on the reconnect after a lost PUBACK; an older entry
# is more likely an earlier, identical status whose packet id the client has since reused.
_UNSTAMPED_MAX_AGE = timedelta(minutes=1)

# Statuses one connection may have read but not yet committed; past it, the connection is not read until one is.
READ_WINDOW = 64


class ReadGate:
    """amqtt's plugin manager as one connection's reader loop sees it, with backpressure added.

    `fire_event(PACKET_RECEIVED)` is the one call amqtt's reader loop awaits between reading a packet and starting
    the task that handles it. Waiting there stops the loop reading from that socket (and so the publisher, through
    TCP flow control) at a packet boundary, without touching amqtt's framing. A PUBLISH waits while this connection
    has READ_WINDOW publishes not yet committed, or while the ingest queue is full: memory stays bounded by the
    queue plus READ_WINDOW per connection, whatever the load, and nothing is dropped.
    """

    def __init__(self, broker: SpotboxBroker) -> None:
        self._broker = broker
        self._plugins: PluginManager[BrokerContext] = broker.plugins_manager
        self._in_flight = 0
        self._slot_freed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plugins, name)

    async def fire_event(self, event_name: Any, *, wait: bool = False, **kwargs: Any) -> None:
        """Hold a PUBLISH until this connection and the queue have room, then let amqtt's plugins see it."""
        if event_name == MQTTEvents.PACKET_RECEIVED and isinstance(kwargs.get("packet"), PublishPacket):
            pipeline = self._broker.pipeline
            if self._in_flight >= READ_WINDOW or pipeline.full:
                self._broker.paused_connections += 1
                try:
                    while self._in_flight >= READ_WINDOW:
                        self._slot_freed.clear()
                        await self._slot_freed.wait()
                    await pipeline.wait_for_room()
                finally:
                    self._broker.paused_connections -= 1
            self._in_flight += 1
        await self._plugins.fire_event(event_name, wait=wait, **kwargs)

    def release(self) -> None:
        """One publish this connection read is committed, refused or routed: its slot is free."""
        self._in_flight -= 1
        self._slot_freed.set()


class SpotboxProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker handler, with status validation and commit ahead of the acknowledgement."""

    def __init__(self, broker: SpotboxBroker, **kwargs: Any) -> None:
        gate = ReadGate(broker)
        super().__init__(gate, **kwargs)
        self._gate = gate
        self._broker = broker
        self._acks = bytearray()
        self._ack_flush: asyncio.Task[None] | None = None

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """Validate and commit a status before it is acknowledged and routed; other topics pass to amqtt untouched."""
        try:
            await self._handle_publish(publish_packet)
        except ProtocolHandlerError as exc:
            # amqtt cancels this task when the connection closes, turns the cancellation into this error, and
            # never awaits the task: without this, each lost acknowledgement would log a traceback.
            logger.debug("publish on a closing connection: %s", exc)

    async def _handle_publish(self, publish_packet: PublishPacket) -> None:
        try:
            outcome = await self._ingest(publish_packet)
        finally:
            # Released before any acknowledgement flow: a QoS 2 flow waits for a PUBREL the reader must read.
            self._gate.release()
        if isinstance(outcome, Refusal):
            await self._refuse(publish_packet, outcome)
        elif outcome is _Outcome.STORED and publish_packet.qos != QOS_2 and self.session is not None:
            # amqtt's flow would queue the message for this client's delivery loop, which wakes once per message
            # (new waiter tasks each time) only to hand it to the broadcast queue: route it from here instead.
            await self._broker.route_stored(self.session, publish_packet)
            if publish_packet.qos == QOS_1:
                self._acknowledge(publish_packet.packet_id)
        elif outcome is not _Outcome.NOT_STORED:
            await super().handle_publish(publish_packet)

    async def _ingest(self, publish_packet: PublishPacket) -> _Outcome | Refusal:
        """Check the user's grant, then validate and commit a status: STORED; NOT_STORED (left unacknowledged: an
        MQTT client resends an unacknowledged QoS 1/2 message); a Refusal (denied or invalid: acknowledged only);
        or OTHER_TOPIC for amqtt to route as it is."""
        topic = publish_packet.topic_name
        data = publish_packet.data
        if topic is not None and not may_publish(self._broker.users, self.session, topic):
            # MQTT 3.1.1 has no way to say no to a PUBLISH: acknowledge it as the protocol requires, drop it.
            logger.warning("mqtt publish denied: user %r may not publish to %r", self._username, topic)
            return Refusal(NOT_AUTHORIZED, f"user {self._username!r} may not publish to {topic!r}")
        serial = status_topic_serial(topic) if topic is not None else None
        if serial is None or data is None:
            return _Outcome.OTHER_TOPIC
        pipeline = self._broker.pipeline
        delivery = None
        if publish_packet.qos and self.session is not None and self.session.client_id is not None:
            # Kept with a status without a timestamp, so a resend after a restart is stored once.
            delivery = Delivery(self.session.client_id, publish_packet.packet_id, bool(publish_packet.dup_flag))
        verdict = pipeline.check(serial, data, self._first_received_at(publish_packet), delivery=delivery)
        if isinstance(verdict, Rejection):
            await self._broker.report_rejection(topic, verdict, data)
            return Refusal(PAYLOAD_FORMAT_INVALID, verdict.reason)
        if publish_packet.qos and verdict.ts == verdict.received_at:
            self._remember_unstamped(publish_packet, verdict.payload_hash, verdict.received_at)
        try:
            await pipeline.commit(verdict)
        except StorageError as exc:
            logger.error("status of %s not stored, not acknowledged: %s", serial, exc)
            return _Outcome.NOT_STORED
        return _Outcome.STORED

    def _acknowledge(self, packet_id: int) -> None:
        """Queue a PUBACK; the acks of one committed batch go out in one write, not one system call each.

        A batch commit resolves its statuses' futures together, so their handlers all run in the same event-loop
        turn; the flush task starts after them.
        """
        self._acks += PUBACK_HEADER + packet_id.to_bytes(2, "big")
        if self._ack_flush is None:
            self._ack_flush = asyncio.create_task(self._flush_acks(), name="spotbox-puback-flush")

    async def _flush_acks(self) -> None:
        data, self._acks = bytes(self._acks), bytearray()
        try:
            if self.writer is not None:
                async with self._write_lock:
                    self.writer.write(data)
                    await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            # The client is gone; it resends what it saw no PUBACK for.
            logger.debug("PUBACKs not sent: %r", exc)
        finally:
            self._ack_flush = None
            if self._acks:
                self._ack_flush = asyncio.create_task(self._flush_acks(), name="spotbox-puback-flush")

    def _first_received_at(self, publish_packet: PublishPacket) -> datetime | None:
        """For a resend (DUP) of a status without a timestamp, when it was first received, else None.

        Such a status takes its receive time as `ts`. A robot that saw no PUBACK resends it with the same packet id
        and DUP set; giving it its first receive time gives it the same `ts`, so storage keeps it once.
        """
        if not publish_packet.dup_flag or self.session is None:
            return None
        unstamped: OrderedDict[int, tuple[bytes, datetime]] | None = self.session.attributes.get(_UNSTAMPED)
        first = unstamped.get(publish_packet.packet_id) if unstamped else None
        if first is None or first[0] != payload_digest(publish_packet.data):
            return None
        if datetime.now(UTC) - first[1] > _UNSTAMPED_MAX_AGE:
            return None
        return first[1]

    def _remember_unstamped(self, publish_packet: PublishPacket, digest: bytes, received_at: datetime) -> None:
        """Keep the receive time of a QoS 1/2 status without a timestamp, in the session, for its resends."""
        if self.session is None:
            return
        unstamped = self.session.attributes.setdefault(_UNSTAMPED, OrderedDict())
        unstamped[publish_packet.packet_id] = (digest, received_at)
        unstamped.move_to_end(publish_packet.packet_id)
        if len(unstamped) > _UNSTAMPED_MAX:
            unstamped.popitem(last=False)

    @property
    def _username(self) -> str | None:
        return self.session.username if self.session is not None else None

    async def _refuse(self, publish_packet: PublishPacket, refusal: Refusal) -> None:
        """Answer a refused publish: MQTT 3.1.1 has no way to say no, so it gets the plain acknowledgement."""
        await self._acknowledge_only(publish_packet)

    async def _acknowledge_only(self, publish_packet: PublishPacket) -> None:
        """Run the protocol's acknowledgement flow for a message that is then never routed, stored or streamed."""
        message = RejectedMessage(
            publish_packet.packet_id,
            publish_packet.topic_name,
            publish_packet.qos,
            publish_packet.data,
            publish_packet.retain_flag,
        )
        message.publish_packet = publish_packet
        await self._handle_message_flow(message)
