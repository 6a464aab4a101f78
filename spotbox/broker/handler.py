"""The per-connection protocol handler: validation and durable storage happen here, before any acknowledgement.

amqtt acknowledges a QoS 1/2 PUBLISH in the handler before the broker or any plugin sees it, and plugin hooks
cannot veto a message (see docs/design.md). So spotbox's hook is the handler's `handle_publish`, the task amqtt
starts for each received PUBLISH: a status is validated and committed first; only then does amqtt's own flow
acknowledge it and queue it for routing. A rejected status, and any publish the user is not granted (checked
first, on every topic), is acknowledged as its protocol allows but wrapped in `RejectedMessage`, which
`SpotboxBroker` never routes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from amqtt.errors import ProtocolHandlerError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket
from amqtt.session import IncomingApplicationMessage

from spotbox.broker.auth import may_publish
from spotbox.errors import StorageError
from spotbox.status import dumps, status_topic_serial
from spotbox.validation import Rejection

if TYPE_CHECKING:
    from spotbox.broker.server import SpotboxBroker

logger = logging.getLogger(__name__)

REJECTED_TOPIC = "spotbox/rejected/{serial}"


class RejectedMessage(IncomingApplicationMessage):
    """An invalid status: acknowledged per protocol, never routed, stored or streamed."""

    __slots__ = ()


class SpotboxProtocolHandler(BrokerProtocolHandler):
    """amqtt's broker handler, with status validation and commit ahead of the acknowledgement."""

    def __init__(self, broker: SpotboxBroker, **kwargs: Any) -> None:
        super().__init__(broker.plugins_manager, **kwargs)
        self._broker = broker

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        """Validate and commit a status before amqtt acknowledges and routes it; other topics pass untouched."""
        try:
            await self._check_and_publish(publish_packet)
        except ProtocolHandlerError as exc:
            # amqtt cancels this task when the connection closes, turns the cancellation into this error, and
            # never awaits the task: without this, each lost acknowledgement would log a traceback.
            logger.debug("publish on a closing connection: %s", exc)

    async def _check_and_publish(self, publish_packet: PublishPacket) -> None:
        topic = publish_packet.topic_name
        data = publish_packet.data
        if topic is not None and not may_publish(self._broker.users, self.session, topic):
            # MQTT 3.1.1 has no way to say no to a PUBLISH: acknowledge it as the protocol requires, drop it.
            logger.warning("mqtt publish denied: user %r may not publish to %r", self._username, topic)
            await self._acknowledge_only(publish_packet)
            return
        serial = status_topic_serial(topic) if topic is not None else None
        if serial is None or data is None:
            await super().handle_publish(publish_packet)
            return
        pipeline = self._broker.pipeline
        verdict = pipeline.check(serial, data)
        if isinstance(verdict, Rejection):
            await self._broker.report_rejection(topic, verdict, data)
            await self._acknowledge_only(publish_packet)
            return
        try:
            await pipeline.commit(verdict)
        except StorageError as exc:
            # Not stored, so not acknowledged: an MQTT client resends an unacknowledged QoS 1/2 message.
            logger.error("status of %s not stored, not acknowledged: %s", serial, exc)
            return
        await super().handle_publish(publish_packet)

    @property
    def _username(self) -> str | None:
        return self.session.username if self.session is not None else None

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


def rejection_report(topic: str, rejection: Rejection, payload: bytes) -> bytes:
    """The JSON an operator sees on `spotbox/rejected/{serial}`."""
    try:
        shown: Any = payload.decode()
    except UnicodeDecodeError:
        shown = payload.decode("utf-8", errors="replace")
    return dumps({"topic": topic, "errors": rejection.errors, "payload": shown})
