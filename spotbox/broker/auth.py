"""Who may connect and which topics each user may use, through amqtt's authentication and topic plugins.

Without a users file: anonymous clients, from this machine only (docs/security.md). With one: a username and
password for every connection (`PasswordAuth`), and per-user topic grants (`TopicGrants`) for subscriptions.
Publishes are checked by the protocol handler itself, before a status is validated or stored.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from spotbox.broker.mqtt5_routing import shared_filter
from spotbox.settings import is_loopback
from spotbox.users import Users

logger = logging.getLogger(__name__)


class LocalAnonymousAuth(BaseAuthPlugin):
    """Accept any client whose connection comes from a loopback address."""

    async def authenticate(self, *, session: Session) -> bool:
        """Accept loopback peers. Unlike amqtt's anonymous plugin, the session keeps its persistence."""
        # remote_address is "" for the WebSocket listener's peers only when aiohttp cannot tell; refuse those.
        return bool(session.remote_address) and is_loopback(str(session.remote_address))


class PasswordAuth(BaseAuthPlugin):
    """Accept a client only with the username and password of a user in the users file."""

    @dataclass
    class Config:
        """amqtt fills this from the plugin's configuration: the loaded users file."""

        users: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        """True for a known user with the right password; anonymous clients are refused."""
        users: Users = self.config.users
        peer = f"{session.remote_address}:{session.remote_port}"
        if not session.username:
            logger.warning("mqtt connection refused: anonymous client %s from %s", session.client_id, peer)
            return False
        # argon2 takes tens of milliseconds by design: off the event loop, so other clients are not held up.
        user = await asyncio.to_thread(users.authenticate, session.username, session.password or "")
        if user is None:
            logger.warning("mqtt connection refused: bad username or password for %r from %s", session.username, peer)
            return False
        return True


def may_publish(users: Users | None, session: Session | None, topic: str) -> bool:
    """True when the session's user may publish to `topic` (always, in the anonymous local-only mode)."""
    if users is None:
        return True
    user = users.by_name.get(session.username) if session is not None and session.username else None
    return user is not None and user.may_publish(topic)


class TopicGrants(BaseTopicPlugin):
    """Let a user subscribe to its own `robot/{name}/#` and to the filters the users file grants it."""

    @dataclass
    class Config:
        """amqtt fills this from the plugin's configuration: the loaded users file."""

        users: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        """Subscriptions are checked against the grants; publishes were checked on arrival, deliveries pass."""
        users: Users = self.config.users
        if topic is None:
            return False
        if action == Action.PUBLISH:
            return may_publish(users, session, topic)
        if action != Action.SUBSCRIBE:
            return True
        name = session.username if session is not None else None
        user = users.by_name.get(name) if name else None
        # A shared subscription is granted as the filter it shares.
        shared = shared_filter(topic)
        allowed = user is not None and user.may_subscribe(topic if shared is None else shared[1])
        if not allowed:
            logger.warning("mqtt subscribe denied: user %r may not subscribe to %r", name, topic)
        return allowed
