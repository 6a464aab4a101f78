"""Logins over HTTP: Basic credentials (RFC 7617) checked against the users file, as an MQTT login is.

Operators' routes (registering robots, acknowledging alerts) call `operator`; a read-route middleware can share it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

from aiohttp import hdrs, web

from spotbox.errors import ForbiddenError, UnauthorizedError
from spotbox.keys import SETTINGS
from spotbox.users import User, Users

logger = logging.getLogger(__name__)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(name, password) of an `Authorization: Basic ...` header (RFC 7617), None when it is not one."""
    # aiohttp's BasicAuth would do this, but it is deprecated for removal in aiohttp 4.
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        # RFC 7617: names and passwords are UTF-8, as they are in MQTT.
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon else None


async def login(request: web.Request, users: Users) -> User:
    """The user of the request's HTTP Basic credentials, checked as an MQTT login is; 401 without one."""
    peer = request.remote
    credentials = _basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
    if credentials is None:
        logger.warning("http request refused: no Basic credentials from %s", peer)
        raise UnauthorizedError("authentication required")
    # argon2 takes tens of milliseconds by design: off the event loop, and an unknown name costs the same.
    user = await asyncio.to_thread(users.authenticate, *credentials)
    if user is None:
        logger.warning("http request refused: bad username or password for %r from %s", credentials[0], peer)
        raise UnauthorizedError("bad username or password")
    return user


async def operator(request: web.Request, *, manage: bool = False) -> str | None:
    """The logged-in user's name under --users (401 without a login; 403 without the manage grant when `manage`);
    None without --users, where spotbox serves loopback only."""
    users = request.app[SETTINGS].users
    if users is None:
        return None
    user = await login(request, users)
    if manage and not user.manage:
        logger.warning(
            "http request refused: user %r has no manage grant for %s %s", user.name, request.method, request.path
        )
        raise ForbiddenError("this user may not manage the fleet", {"user": user.name})
    return user.name
