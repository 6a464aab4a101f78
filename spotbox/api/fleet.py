"""The fleet: registered and seen robots with presence and latest status; the registry (POST, PATCH, DELETE)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from spotbox import rawjson
from spotbox.api.body import read_body
from spotbox.api.errors import error_response, json_response
from spotbox.api.login import operator
from spotbox.api.params import serial_param
from spotbox.errors import BadRequestError, NotFoundError
from spotbox.keys import OPS, SETTINGS, STORAGE
from spotbox.ops.presence import STATES
from spotbox.ops.store import RegisteredRobot, delete_robot, save_robot
from spotbox.status import StatusRow, is_valid_serial

logger = logging.getLogger(__name__)

_TEXT_FIELDS = ("name", "model", "site")
_TEXT_MAX = 200
_TAGS_MAX = 50


def robot_summary(
    request: web.Request, serial: str, latest: StatusRow | None, last_seen: dict[str, datetime]
) -> dict[str, Any]:
    """A robot as /robots shows it: serial, presence, registry fields, when it was last seen and its latest status.

    `last_seen` is a receive time, never a robot's own timestamp: a robot sending old statuses after an outage
    was still seen now.
    """
    return {
        "serial_number": serial,
        **request.app[OPS].summary(serial),
        "last_seen": last_seen.get(serial, latest.received_at) if latest else None,
        "latest": latest.to_api() if latest else None,
    }


async def storage_last(request: web.Request, serial: str) -> dict[str, datetime]:
    """When the robot's most recently stored status was received (empty for a robot never seen)."""
    return await request.app[STORAGE].last_received(serial)


def _filters(request: web.Request) -> tuple[str | None, str | None, str | None]:
    site, tag, presence = (request.query.get(name) or None for name in ("site", "tag", "presence"))
    if presence is not None and presence not in STATES:
        raise BadRequestError(f"presence must be one of {', '.join(STATES)}", {"presence": presence})
    return site, tag, presence


async def list_robots(request: web.Request) -> web.Response:
    """GET /robots: every robot registered or seen, by serial number; filters `site`, `tag`, `presence`."""
    site, tag, presence = _filters(request)
    storage = request.app[STORAGE]
    rows = {row.serial_number: row for row in await storage.latest_per_robot()}
    last_seen = await storage.last_received()
    serials = sorted(rows.keys() | request.app[OPS].registry.keys(), key=lambda s: s.encode())
    items = [robot_summary(request, serial, rows.get(serial), last_seen) for serial in serials]
    items = [
        item for item in items
        if (site is None or item["site"] == site)
        and (tag is None or tag in item["tags"])
        and (presence is None or item["presence"] == presence)
    ]  # fmt: skip
    return json_response({"items": items})


async def get_robot(request: web.Request) -> web.Response:
    """GET /robots/{serial}: one robot's presence, registry fields and latest status; 404 if neither seen nor
    registered."""
    serial = serial_param(request)
    storage = request.app[STORAGE]
    latest = await storage.latest(serial)
    if latest is None and serial not in request.app[OPS].registry:
        raise NotFoundError("unknown robot", {"serial_number": serial})
    return json_response(robot_summary(request, serial, latest, await storage.last_received(serial)))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequestError("body is not JSON", None) from None
    if not isinstance(body, dict):
        raise BadRequestError("body must be a JSON object", None)
    # The checks a status's text gets (orjson keeps the last of two equal keys, and so on): refused alike.
    max_depth = request.app[SETTINGS].max_json_depth
    if problem := rawjson.screen(raw, body, max_depth):
        too_deep = f"nests objects and arrays deeper than {max_depth} levels"
        raise BadRequestError(f"body: {too_deep if problem is rawjson.TOO_DEEP else problem}", None)
    return body


def _fields(body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    """The registry fields of a POST or PATCH body, checked; 400 naming the first bad one."""
    allowed = {*_TEXT_FIELDS, "tags"} | (set() if partial else {"serial_number"})
    if unknown := sorted(set(body) - allowed):
        raise BadRequestError(f"unknown field(s): {', '.join(unknown)}", {"allowed": sorted(allowed)})
    fields: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if name in body:
            value = body[name]
            if value is not None and (not isinstance(value, str) or len(value) > _TEXT_MAX or "\x00" in value):
                raise BadRequestError(
                    f"{name} must be a string of at most {_TEXT_MAX} characters (no NUL) or null", None
                )
            fields[name] = value
    if "tags" in body:
        tags = body["tags"]
        if (
            not isinstance(tags, list)
            or len(tags) > _TAGS_MAX
            or not all(isinstance(t, str) and 0 < len(t) <= 64 and "\x00" not in t for t in tags)
        ):
            raise BadRequestError(
                f"tags must be a list of at most {_TAGS_MAX} strings of 1 to 64 characters (no NUL)", None
            )
        fields["tags"] = tuple(dict.fromkeys(tags))
    return fields


async def register_robot(request: web.Request) -> web.Response:
    """POST /robots: register a robot (serial_number, name, model, site, tags); 201, or 409 if registered."""
    user = await operator(request, manage=True)
    body = await _body(request)
    serial = body.get("serial_number")
    if not isinstance(serial, str) or not is_valid_serial(serial):
        raise BadRequestError("serial_number must be a robot serial number", {"serial_number": serial})
    fields = _fields(body, partial=False)
    ops = request.app[OPS]
    if serial in ops.registry:
        return error_response(409, "robot already registered", {"serial_number": serial})
    now = ops.clock()
    robot = RegisteredRobot(
        serial, fields.get("name"), fields.get("model"), fields.get("site"), fields.get("tags", ()), now, now
    )
    await save_robot(request.app[STORAGE], robot)
    ops.registered(robot)
    logger.info("robot %s registered by %s", serial, user or "a local operator")
    latest = await request.app[STORAGE].latest(serial)
    return json_response(robot_summary(request, serial, latest, await storage_last(request, serial)), status=201)


async def update_robot(request: web.Request) -> web.Response:
    """PATCH /robots/{serial}: change a registered robot's name, model, site or tags; 404 if not registered."""
    user = await operator(request, manage=True)
    serial = serial_param(request)
    fields = _fields(await _body(request), partial=True)
    ops = request.app[OPS]
    current = ops.registry.get(serial)
    if current is None:
        raise NotFoundError("robot not registered", {"serial_number": serial})
    robot = RegisteredRobot(
        serial,
        fields.get("name", current.name),
        fields.get("model", current.model),
        fields.get("site", current.site),
        fields.get("tags", current.tags),
        current.registered_at,
        ops.clock(),
    )
    await save_robot(request.app[STORAGE], robot)
    ops.registered(robot)
    logger.info("robot %s changed by %s", serial, user or "a local operator")
    latest = await request.app[STORAGE].latest(serial)
    return json_response(robot_summary(request, serial, latest, await storage_last(request, serial)))


async def deregister_robot(request: web.Request) -> web.Response:
    """DELETE /robots/{serial}: remove a robot from the registry (its statuses stay); 204, 404 if not registered."""
    user = await operator(request, manage=True)
    serial = serial_param(request)
    if not await delete_robot(request.app[STORAGE], serial):
        raise NotFoundError("robot not registered", {"serial_number": serial})
    request.app[OPS].deregistered(serial)
    logger.info("robot %s removed from the registry by %s", serial, user or "a local operator")
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    """Register the fleet routes."""
    app.router.add_get("/robots", list_robots)
    app.router.add_post("/robots", register_robot)
    app.router.add_get("/robots/{serial}", get_robot)
    app.router.add_patch("/robots/{serial}", update_robot)
    app.router.add_delete("/robots/{serial}", deregister_robot)
