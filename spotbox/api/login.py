"""Who is asking, for the operators' routes (registering robots, acknowledging alerts).

With --users, the read-route middleware (`spotbox.api.auth`) has usually logged the user in already (a session
cookie or HTTP Basic) and left them on the request; with --open-reads it has not, and HTTP Basic is checked here,
as an MQTT login is.
"""

from __future__ import annotations

import logging

from aiohttp import hdrs, web

from spotbox.api.auth import USER_KEY
from spotbox.api.ingest import basic_credentials, check_password
from spotbox.errors import ForbiddenError, UnauthorizedError
from spotbox.keys import RUNTIME
from spotbox.users import User, Users

logger = logging.getLogger(__name__)


async def login(request: web.Request, users: Users) -> User:
    """The user of the request's HTTP Basic credentials; 401 without valid ones."""
    credentials = basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
    if credentials is None:
        logger.warning("http request refused: no Basic credentials from %s", request.remote)
        raise UnauthorizedError("authentication required")
    user = await check_password(request, users, *credentials)
    if user is None:
        logger.warning("http request refused: bad username or password for %r from %s", credentials[0], request.remote)
        raise UnauthorizedError("bad username or password")
    return user


async def operator(request: web.Request, *, manage: bool = False) -> str | None:
    """The logged-in user's name under --users (401 without a login; 403 without the manage grant when `manage`);
    None without --users, where spotbox serves loopback only."""
    users = request.app[RUNTIME].users
    if users is None:
        return None
    user = request.get(USER_KEY) or await login(request, users)
    if manage and not user.manage:
        logger.warning(
            "http request refused: user %r may not manage the fleet (%s %s)", user.name, request.method, request.path
        )
        raise ForbiddenError("this user may not manage the fleet", {"user": user.name})
    return user.name
