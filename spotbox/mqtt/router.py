"""Fan-out: one message to every session whose subscriptions match it, each copy as its subscriptions ask.

Per client, all its matching (non-shared) subscriptions make ONE copy [MQTT-3.3.4-2]: at the highest granted QoS,
capped by the published QoS (MQTT 3.1.1 and 5.0 section 3.8.4), carrying every matching
subscription identifier [MQTT-3.3.4-3], with RETAIN kept if one of them is Retain As Published [MQTT-3.3.1-12],
and none at all when every one of them is No Local and the client published it [MQTT-3.8.3-3]. A shared
subscription is a copy of its own, to the one member the tree picked. The connection then sends it (within the
client's Receive Maximum, Maximum Packet Size, topic aliases and outbound budget) or the session queues it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from spotbox.mqtt.message import Message
from spotbox.mqtt.sessions import Queued, Session, Sessions
from spotbox.mqtt.subscriptions import Subscription, SubscriptionTree

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RouterCounters:
    """Messages not delivered, by why, for /metrics."""

    # The delivery raised (a PUBLISH the subscriber's encoder refused, say): dropped for that subscriber.
    failed: int = 0


class Router:
    """Routes messages through the subscription tree to sessions."""

    def __init__(self, tree: SubscriptionTree[str], sessions: Sessions) -> None:
        self.tree = tree
        self.sessions = sessions
        self.counters = RouterCounters()
        self._available: Callable[[str], bool] = self._connected

    def _connected(self, client_id: str) -> bool:
        session = self.sessions.get(client_id)
        return session is not None and session.connected

    def route(self, message: Message, sender: str | None) -> int:
        """Deliver `message` (published by client id `sender`, None for spotbox itself); the copies made."""
        copies = 0
        for client_id, subscriptions in self.tree.match(message.topic, self._available).items():
            session = self.sessions.get(client_id)
            if session is None:
                continue
            plain: list[Subscription] = []
            try:
                for subscription in subscriptions:
                    if subscription.share_group is not None:
                        copies += self._deliver(session, message, [subscription])
                    elif not (subscription.no_local and client_id == sender):
                        plain.append(subscription)
                if plain:
                    copies += self._deliver(session, message, plain)
            except Exception as exc:
                # One subscriber's failure is neither the publisher's nor the other subscribers'.
                self.counters.failed += 1
                logger.error("message on %r not delivered to %r: %r", message.topic, client_id, exc)
        return copies

    def _deliver(self, session: Session, message: Message, subscriptions: list[Subscription]) -> int:
        granted = max(subscription.qos for subscription in subscriptions)
        qos = min(message.qos, granted)
        retain = message.retain and any(subscription.retain_as_published for subscription in subscriptions)
        ids = [s.identifier for s in subscriptions if s.identifier is not None]
        deliver(self.sessions, session, Queued(message, qos, retain, ids))
        return 1


def deliver(sessions: Sessions, session: Session, item: Queued) -> None:
    """Send to the session's connection, or queue a QoS 1/2 message for a persistent offline session."""
    if session.connection is not None:
        session.connection.send_publish(item)
    elif item.qos and session.persistent:
        sessions.enqueue(session, item)
