"""Authentication for the no-users mode: anonymous clients, from this machine only (SPEC section 7)."""

from __future__ import annotations

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from spotbox.settings import is_loopback


class LocalAnonymousAuth(BaseAuthPlugin):
    """Accept any client whose connection comes from a loopback address."""

    async def authenticate(self, *, session: Session) -> bool:
        """Accept loopback peers. Unlike amqtt's anonymous plugin, the session keeps its persistence."""
        # remote_address is "" for the WebSocket listener's peers only when aiohttp cannot tell; refuse those.
        return bool(session.remote_address) and is_loopback(str(session.remote_address))
