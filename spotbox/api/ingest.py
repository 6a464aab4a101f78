"""POST /robots/{serial}/status: HTTP ingest for robots without MQTT, through the same pipeline as MQTT."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging

import orjson
from aiohttp import hdrs, web

from spotbox.api.body import read_body
from spotbox.api.errors import json_response
from spotbox.api.params import serial_param
from spotbox.errors import (
    BadRequestError,
    ForbiddenError,
    InvalidStatusError,
    StorageUnavailableError,
    UnauthorizedError,
)
from spotbox.keys import BROKER, PIPELINE, RUNTIME, SETTINGS
from spotbox.users import User, Users
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)


def basic_credentials(header: str) -> tuple[str, str] | None:
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


async def check_password(request: web.Request, users: Users, name: str, password: str) -> User | None:
    """The user whose password `password` is, or None; checked as MQTT logins are (`Broker.auth`): argon2 in the
    broker's bounded pool, attempts served address by address, failed ones slowing their address down, a verified
    password remembered. Each HTTP request with a new wrong password once took a thread of its own for its hash: 50
    at once slowed MQTT ingest 4.5 times."""
    if BROKER in request.app and request.app[BROKER].auth.users is not None:
        result = await request.app[BROKER].auth.login(name, password.encode(), request.remote or "")
        return users.by_name.get(name) if result.ok else None
    # No broker (cluster mode): argon2 takes tens of milliseconds by design, off the event loop.
    return await asyncio.to_thread(users.authenticate, name, password)


async def _login(request: web.Request, users: Users) -> User:
    """The user of the request's HTTP Basic credentials, checked as an MQTT login is; 401 without one."""
    peer = request.remote
    credentials = basic_credentials(request.headers.get(hdrs.AUTHORIZATION, ""))
    if credentials is None:
        logger.warning("http ingest refused: no Basic credentials from %s", peer)
        raise UnauthorizedError("authentication required")
    user = await check_password(request, users, *credentials)
    if user is None:
        logger.warning("http ingest refused: bad username or password for %r from %s", credentials[0], peer)
        raise UnauthorizedError("bad username or password")
    return user


def _is_json(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


async def post_status(request: web.Request) -> web.Response:
    """Validate a status and answer 202 once it is committed: 400 not JSON, 422 invalid, 503 storage away.

    With a users file, only a user who may publish to `robot/{serial}/status` over MQTT may post it: 401, 403.
    """
    settings = request.app[SETTINGS]
    # Credentials are checked before anything else, so a stranger learns nothing and no body of theirs is read.
    users = request.app[RUNTIME].users
    user = await _login(request, users) if users is not None else None
    serial = serial_param(request)
    topic = f"robot/{serial}/status"
    if user is not None and not user.may_publish(topic):
        logger.warning("http ingest refused: user %r may not publish to %r", user.name, topic)
        raise ForbiddenError("not authorized for this robot", {"topic": topic})
    raw = await read_body(request)
    pipeline = request.app[PIPELINE]
    # Counted and logged exactly as a status that came over MQTT (a large one validated off the event loop).
    verdict = await pipeline.check_large(serial, raw)
    if isinstance(verdict, Rejection):
        # Operators watching spotbox/rejected/+ see every rejection, whatever the transport.
        await request.app[BROKER].report_rejection(topic, verdict, raw)
        # A number orjson cannot read (1e400) names its field: that is an invalid status, not a malformed body.
        if verdict.field == "payload" and not _is_json(raw):
            raise BadRequestError("body is not JSON", {"errors": verdict.errors, "field": verdict.field})
        raise InvalidStatusError(verdict.errors, verdict.field)
    if not pipeline.storage_available:
        # The writer is retrying a batch: answer now rather than hold the request for the whole outage.
        raise StorageUnavailableError("the writer is waiting for storage")
    timeout = settings.ingest_timeout_s
    try:
        async with asyncio.timeout(timeout):
            row_id = await pipeline.commit(verdict)
    except TimeoutError:
        # Not acknowledged, like an MQTT status without PUBACK: the client retries, the dedup key
        # (robot, ts, payload) keeps a status with a timestamp from being stored twice.
        raise StorageUnavailableError(f"status not committed within {timeout:g} s") from None
    return json_response({"id": row_id, "duplicate": row_id is None}, status=202)


def add_routes(app: web.Application) -> None:
    """Register the HTTP ingest route."""
    app.router.add_post("/robots/{serial}/status", post_status)
