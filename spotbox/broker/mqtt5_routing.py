"""MQTT 5 routing on amqtt's broker core: subscription options, subscription identifiers and shared subscriptions.

amqtt routes a message to every (filter, session) pair whose filter matches, with the RETAIN flag cleared. MQTT 5
subscriptions carry options that change this per subscription [MQTT-3.8.3.1]: No Local (not back to the publishing
client), Retain As Published (the RETAIN flag kept), Retain Handling (whether retained messages are sent on
SUBSCRIBE) and a Subscription Identifier (told back in each PUBLISH). They live on the session (its attributes,
so a resumed session keeps them) as `SubscriptionOptions` per filter; a session without them is MQTT 3.1.1 and is
routed exactly as amqtt routes it. A shared subscription `$share/{group}/{filter}` is kept in amqtt's map under
its full name, and each message goes to one of its subscribers in turn (MQTT 5.0 section 4.8.2).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OutgoingApplicationMessage, Session

logger = logging.getLogger(__name__)

SHARE_PREFIX = "$share/"
# Session attribute: filter -> SubscriptionOptions of an MQTT 5 session (absent for an MQTT 3.1.1 one).
OPTIONS = "spotbox.subscription_options"
# The RETAIN flag of the PUBLISH amqtt's delivery step is routing: amqtt's `_broadcast_message` has no parameter
# for it, and this task-local value reaches it through amqtt's own call without a copy of that step.
PUBLISH_RETAIN: ContextVar[bool] = ContextVar("spotbox_publish_retain", default=False)


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What an MQTT 5 SUBSCRIBE asked of one filter, beyond its QoS, once the subscription exists."""

    no_local: bool = False
    retain_as_published: bool = False
    subscription_id: int | None = None


PLAIN = SubscriptionOptions()


def subscription_options(session: Session) -> dict[str, SubscriptionOptions] | None:
    """The subscription options of an MQTT 5 session, per filter; None for an MQTT 3.1.1 session."""
    options: dict[str, SubscriptionOptions] | None = session.attributes.get(OPTIONS)
    return options


def shared_filter(pattern: str) -> tuple[str, str] | None:
    """(group, filter) of a shared subscription `$share/{group}/{filter}`; None for any other filter."""
    if not pattern.startswith(SHARE_PREFIX):
        return None
    group, _, topic_filter = pattern[len(SHARE_PREFIX) :].partition("/")
    return group, topic_filter


def valid_shared(pattern: str) -> bool:
    """True for a well formed shared subscription: a group name without wildcards and a filter [MQTT-4.8.2-1, 2]."""
    shared = shared_filter(pattern)
    return shared is not None and bool(shared[0]) and not {"+", "#"} & set(shared[0]) and bool(shared[1])


class Mqtt5RoutingBroker(Broker):
    """amqtt's Broker, routing by MQTT 5 subscription options and shared subscriptions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Shared subscription -> how many messages it has handed out (its round robin position).
        self._share_turns: dict[str, int] = {}

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        message = wait_deliver.result()
        packet = getattr(message, "publish_packet", None)
        token = PUBLISH_RETAIN.set(bool(packet is not None and packet.retain_flag))
        try:
            result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        finally:
            PUBLISH_RETAIN.reset(token)
        return result

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
        retain: bool | None = None,
    ) -> None:
        broadcast: dict[str, Any] = {"session": session, "topic": topic, "data": data}
        broadcast["retain"] = PUBLISH_RETAIN.get() if retain is None else retain
        if force_qos is not None:
            broadcast["qos"] = force_qos
        await self._broadcast_queue.put(broadcast)

    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for key, subscribers in self._subscriptions.items():
            shared = shared_filter(key)
            if not self._matches(topic, key if shared is None else shared[1]):
                continue
            # A shared subscription delivers each message to one of its subscribers (MQTT 5.0 section 4.8.2).
            targets = [self._next_of_group(key, subscribers)] if shared is not None and subscribers else subscribers
            for target, sub_qos in targets:
                await self._deliver(broadcast, key, target, broadcast.get("qos", sub_qos), running_tasks)

    def _next_of_group(self, key: str, subscriptions: list[tuple[Session, int]]) -> tuple[Session, int]:
        """The member of a shared subscription whose turn it is, connected members first."""
        connected = [sub for sub in subscriptions if sub[0].transitions.state == "connected"]
        members = connected or subscriptions
        turn = self._share_turns.get(key, 0)
        self._share_turns[key] = turn + 1
        return members[turn % len(members)]

    async def _deliver(
        self, broadcast: dict[str, Any], key: str, target: Session, qos: int, running_tasks: Any
    ) -> None:
        """amqtt's delivery of one message to one subscription, with that subscription's MQTT 5 options."""
        topic, source = broadcast["topic"], broadcast["session"]
        options = subscription_options(target)
        option = PLAIN if options is None else options.get(key, PLAIN)
        if option.no_local and source is not None and source.client_id == target.client_id:
            return  # [MQTT-3.8.3-3]
        if not await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
            logger.info("%s may not receive messages on %s", target.client_id, topic)
            return
        connected = target.transitions.state == "connected"
        if not connected and not target.clean_session and qos in (QOS_1, QOS_2) and not target.is_anonymous:
            # amqtt queues QoS 1/2 messages for a disconnected persistent session.
            await self._retain_broadcast_message(broadcast, qos, target)
            return
        handler = self._get_handler(target) if connected else None
        if handler is None:
            return
        publish: Coroutine[Any, Any, OutgoingApplicationMessage]
        if options is None:
            publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
        else:
            # The RETAIN flag is kept only on a Retain As Published subscription [MQTT-3.3.1-12, 3.3.1-13].
            retain = option.retain_as_published and broadcast.get("retain", False)
            ids = [option.subscription_id] if option.subscription_id is not None else []
            publish = handler.mqtt_publish(topic, broadcast["data"], qos, retain, subscription_ids=ids)
        running_tasks.append(asyncio.ensure_future(publish))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Retain Handling 1 (new subscriptions only) and 2 (never) are decided by the handler at SUBSCRIBE.
        handler = self._get_handler(session)
        takes_retained = getattr(handler, "takes_retained", None)
        if takes_retained is not None and not takes_retained(subscription[0]):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)
