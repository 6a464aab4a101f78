"""THE publish path, for every PUBLISH of either protocol version and any QoS: read it top to bottom.

    authorize -> validate -> commit -> route -> acknowledge

1. authorize: the user must be granted the topic (MQTT 5: refused with 0x87; 3.1.1 cannot say no, so the
   publish is acknowledged and dropped).
2. validate: a status (`robot/{serial}/status`) must pass the schema, on its payload alone (properties such as a
   Content Type travel with it but do not change the verdict). A refused status is reported on
   `spotbox/rejected/{serial}` and answered 0x99 with the reason (3.1.1: acknowledged, dropped).
3. commit: a valid status is queued to the one writer; the rest of its path waits for the commit, off the reader
   loop, so the connection keeps reading. Other topics have nothing to commit.
4. route: once committed (at once for other topics) the message goes to its subscribers and, if RETAIN, into the
   retained store.
5. acknowledge: PUBACK (QoS 1) or PUBREC (QoS 2) only now, so "acknowledged" means "stored". QoS 2 keeps only the
   packet id until PUBREL [MQTT-4.3.3, method B: route on receipt].

Acknowledgements leave in the order the PUBLISHes came [MQTT-4.6.0-2]: each connection settles its publishes in
order (`Connection.pending`), whether they waited for a commit or not.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from spotbox.errors import StorageError
from spotbox.mqtt.message import Message
from spotbox.mqtt.wire import PUBACK, PUBREC, Publish
from spotbox.pipeline import OFF_LOOP_MIN
from spotbox.status import Delivery, payload_digest, status_topic_serial
from spotbox.validation import Rejection, rejection_report

if TYPE_CHECKING:
    from spotbox.mqtt.broker import Broker
    from spotbox.mqtt.connection import Connection

logger = logging.getLogger(__name__)

REJECTED_TOPIC = "spotbox/rejected/{serial}"
# MQTT 5 reason codes of a refused PUBLISH.
NOT_AUTHORIZED = 0x87
PAYLOAD_FORMAT_INVALID = 0x99
# How long a first receive time is kept for DUP resends of an unstamped status: a resend comes on the reconnect
# after a lost PUBACK; an older entry is more likely an earlier identical status whose packet id was reused.
UNSTAMPED_MAX_AGE = timedelta(minutes=1)


@dataclass(slots=True)
class Pending:
    """One received PUBLISH on its way through the path: settled (routed, acknowledged) in arrival order."""

    publish: Publish
    message: Message | None  # None: refused, acknowledged only
    commit: asyncio.Future[int | None] | None = None
    refusal: tuple[int, str] | None = None
    serial: str | None = None


class PublishPath:
    """The steps every received PUBLISH takes, with the broker's parts they need."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def receive(self, conn: Connection, publish: Publish, now: float) -> Pending:
        """Steps 1 to 3 (authorize, validate, commit); the connection settles the result in order."""
        broker = self.broker
        session = conn.session
        assert session is not None
        topic = publish.topic
        message = Message(topic, publish.payload, publish.qos, publish.retain, publish.properties, now)
        # 1. authorize
        if not broker.auth.may_publish(session.user, topic):
            logger.warning("mqtt publish denied: user %r may not publish to %r", session.user, topic)
            return Pending(
                publish, None, refusal=(NOT_AUTHORIZED, f"user {session.user!r} may not publish to {topic!r}")
            )
        serial = status_topic_serial(topic)
        if serial is None or (publish.retain and not publish.payload):
            # Not a status: any other topic, or a zero-byte retained message, which deletes the retained status
            # and reaches subscribers as it is [MQTT-3.3.1-10 (3.1.1), MQTT-3.3.1-6 (5.0)].
            return Pending(publish, message)
        # 2. validate (the payload alone), once the writer's queue has room for the status (backpressure)
        pipeline = broker.pipeline
        if pipeline.full:
            await conn.paused(pipeline.wait_for_room())
        delivery = None
        if publish.qos and publish.packet_id is not None:
            # Kept with a status without a timestamp, so a resend after a restart is stored once.
            delivery = Delivery(session.client_id, publish.packet_id, publish.dup)
        first_received_at = self._first_received_at(conn, publish) if publish.dup else None
        if len(publish.payload) < OFF_LOOP_MIN:
            verdict = pipeline.check(serial, publish.payload, first_received_at, delivery=delivery)
        else:  # this connection waits, the others are served
            verdict = await pipeline.check_large(serial, publish.payload, first_received_at, delivery=delivery)
        if isinstance(verdict, Rejection):
            self.report_rejection(topic, verdict, publish.payload)
            return Pending(publish, None, refusal=(PAYLOAD_FORMAT_INVALID, verdict.reason))
        if publish.qos and verdict.ts == verdict.received_at:
            session.remember_unstamped(publish.packet_id or 0, verdict.payload_hash, verdict.received_at)
        # 3. commit: queued now (no await since the room was found), waited for in `settle`
        return Pending(publish, message, commit=pipeline.submit(verdict), serial=serial)

    def settle(self, conn: Connection, pending: Pending) -> None:
        """Steps 4 and 5 (route, acknowledge), once the commit (if any) is done."""
        publish = pending.publish
        session = conn.session  # None once the client has left (the connection ended, or is being closed)
        if pending.commit is not None:
            try:
                pending.commit.result()
            except (StorageError, asyncio.CancelledError) as exc:
                # Not acknowledged: the client sends it again (DUP), and storage keeps one copy.
                logger.error("status of %r not stored, not acknowledged: %s", pending.serial, exc)
                return
            conn.serials.add(pending.serial or "")
            presence = self.broker.presence
            if presence is not None:
                if session is None:
                    presence.committed_after_close(pending.serial or "")
                else:
                    # The robot is online while this connection is up.
                    presence.bind(pending.serial or "", conn)
        # 4. route (a status committed after its client left is still delivered: it is stored)
        if pending.message is not None:
            self.route(pending.message, conn.client_id)
        # 5. acknowledge, unless the client has left (it sends the status again on its next connection)
        if publish.qos == 0 or session is None:
            return
        assert publish.packet_id is not None
        code, reason = pending.refusal or (0, None)
        if publish.qos == 1:
            conn.send_ack(PUBACK, publish.packet_id, code, reason)
            return
        conn.send_ack(PUBREC, publish.packet_id, code, reason)
        if code == 0 or conn.wire.version == 4:
            # The packet id is held until PUBREL [MQTT-4.3.3-9]; a refusal ends an MQTT 5 flow at PUBREC.
            session.awaiting_pubrel.add(publish.packet_id)

    def route(self, message: Message, sender: str | None) -> None:
        """Deliver to subscribers and keep a retained message (an empty one deletes it) [MQTT-3.3.1-5..7]."""
        broker = self.broker
        if message.retain:
            broker.retained.put(message)
        broker.router.route(message, sender)

    def report_rejection(self, topic: str, rejection: Rejection, payload: bytes) -> None:
        """Publish why a status was refused on `spotbox/rejected/{serial}`, for operators to watch."""
        report = rejection_report(topic, rejection, payload)
        message = Message(REJECTED_TOPIC.format(serial=rejection.serial_number), report, 1, False, None, 0.0)
        self.broker.router.route(message, None)

    def _first_received_at(self, conn: Connection, publish: Publish) -> datetime | None:
        """For a DUP resend of a status without a timestamp, when it was first received, else None.

        Such a status takes its receive time as `ts`; giving the resend the first receive time gives it the
        same `ts`, so storage keeps it once.
        """
        if not publish.dup or conn.session is None or publish.packet_id is None:
            return None
        first = conn.session.unstamped.get(publish.packet_id)
        if first is None or first[0] != payload_digest(publish.payload):
            return None
        if datetime.now(UTC) - first[1] > UNSTAMPED_MAX_AGE:
            return None
        return first[1]
