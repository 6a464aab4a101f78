"""MQTT 5 session ends on amqtt's broker core: the Will Delay Interval and a finite Session Expiry Interval.

amqtt publishes a will as soon as its connection is lost, and keeps a persistent session until the broker stops.
For an MQTT 5 session, when its connection ends spotbox starts one task that publishes the will after its delay
(or when the session ends, if that is sooner) [MQTT-3.1.3-9], then discards the session once its expiry interval
has passed [MQTT-3.1.2-23]. A new connection for the session stops the task: the will is not published [MQTT-3.1.3-9],
unless the new connection starts clean, which ends the old session and so publishes its will at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from spotbox.broker.mqtt5_connect import NEVER_EXPIRES, SESSION_EXPIRY, WILL_DELAY
from spotbox.broker.mqtt5_routing import PUBLISH_RETAIN, Mqtt5RoutingBroker

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Will:
    """A will waiting for its delay: what amqtt's session held when the connection ended."""

    topic: str
    message: bytes | bytearray
    qos: int
    retain: bool


@dataclass(slots=True)
class _Ending:
    """The task ending a disconnected MQTT 5 session, and its will while not yet published."""

    task: asyncio.Task[None]
    session: Session
    will: Will | None


class Mqtt5SessionBroker(Mqtt5RoutingBroker):
    """amqtt's Broker, ending MQTT 5 sessions by their will delay and session expiry interval."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Client id -> the ending of its disconnected MQTT 5 session.
        self._endings: dict[str, _Ending] = {}

    async def _handle_disconnect(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        # A will amqtt publishes now is routed with its RETAIN flag, for Retain As Published subscriptions.
        token = PUBLISH_RETAIN.set(bool(client_session.will_retain))
        try:
            await self._end_connection(client_session, handler, disconnect_waiter)
        finally:
            PUBLISH_RETAIN.reset(token)

    async def _end_connection(
        self, client_session: Session, handler: BrokerProtocolHandler, disconnect_waiter: asyncio.Future[Any]
    ) -> None:
        """amqtt's end of a connection; for MQTT 5, the will delayed and the session's ending started."""
        expiry: int | None = client_session.attributes.get(SESSION_EXPIRY)
        if expiry is None:  # an MQTT 3.1.1 session: amqtt's way
            await super()._handle_disconnect(client_session, handler, disconnect_waiter)
            return
        delay = min(client_session.attributes.get(WILL_DELAY, 0), expiry)
        will = None
        if delay and client_session.will_flag and not isinstance(disconnect_waiter.result(), DisconnectPacket):
            assert client_session.will_topic is not None
            assert client_session.will_message is not None
            will = Will(
                client_session.will_topic,
                client_session.will_message,
                client_session.will_qos or 0,
                bool(client_session.will_retain),
            )
            client_session.will_flag = False  # published after its delay, not by amqtt now
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        client_id = client_session.client_id
        # A connection that took the session over meanwhile owns it now.
        taken_over = self._sessions.get(client_id, (None, None))[1] is not handler
        if client_id is None or taken_over or (will is None and not 0 < expiry < NEVER_EXPIRES):
            return
        task = asyncio.create_task(
            self._end(client_session, will, delay, expiry), name=f"spotbox-session-end-{client_id}"
        )
        self._endings[client_id] = _Ending(task, client_session, will)

    async def _end(self, session: Session, will: Will | None, delay: int, expiry: int) -> None:
        """Publish the will after its delay, then discard the session once it has expired."""
        client_id = session.client_id
        assert client_id is not None
        waited = 0
        try:
            if will is not None:
                await asyncio.sleep(delay)
                waited = delay
                self._endings[client_id].will = None
                await self._publish_will(session, will)
            if expiry >= NEVER_EXPIRES:
                return
            await asyncio.sleep(expiry - waited)
            if self._sessions.get(client_id, (None, None))[0] is session and session.transitions.is_disconnected():
                logger.info("mqtt session of %s expired after %d s", client_id, expiry)
                await self._cleanup_session(client_id)
        finally:
            if (ending := self._endings.get(client_id)) is not None and ending.task is asyncio.current_task():
                del self._endings[client_id]

    async def _publish_will(self, session: Session, will: Will) -> None:
        """Route a will as amqtt does when a connection is lost."""
        logger.debug("publishing the will of %s on %s", session.client_id, will.topic)
        await self._broadcast_message(session, will.topic, will.message, will.qos, retain=will.retain)
        if will.retain:
            await self.retain_message(session, will.topic, will.message, will.qos)

    async def reconnected(self, client_id: str, clean_start: bool) -> None:
        """A new connection for `client_id`: its old session's ending stops; a clean start publishes a waiting will."""
        ending = self._endings.pop(client_id, None)
        if ending is None:
            return
        ending.task.cancel()
        await asyncio.gather(ending.task, return_exceptions=True)
        if clean_start and ending.will is not None:
            await self._publish_will(ending.session, ending.will)

    async def shutdown(self) -> None:
        """Stop the session endings (wills not yet published are dropped with their sessions), then amqtt's."""
        endings = [ending.task for ending in self._endings.values()]
        self._endings.clear()
        for task in endings:
            task.cancel()
        await asyncio.gather(*endings, return_exceptions=True)
        await super().shutdown()
