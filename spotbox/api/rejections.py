"""GET /rejections: the newest refused statuses from the rejection record (field, reason, time, payload start)."""

from __future__ import annotations

from aiohttp import web

from spotbox.api.errors import json_response
from spotbox.api.params import int_param
from spotbox.errors import BadRequestError
from spotbox.keys import OPS
from spotbox.status import is_valid_serial

REJECTIONS_LIMIT_DEFAULT = 50
REJECTIONS_LIMIT_MAX = 1000


async def list_rejections(request: web.Request) -> web.Response:
    """GET /rejections: newest first, of one robot with `serial`, at most `limit`."""
    serial = request.query.get("serial") or None
    if serial is not None and not is_valid_serial(serial):
        raise BadRequestError("serial is not a robot serial number", {"serial": serial})
    limit = int_param(request, "limit", REJECTIONS_LIMIT_DEFAULT, 1, REJECTIONS_LIMIT_MAX)
    log = request.app[OPS].rejections
    # What was refused a moment ago is still in the writer's buffer: write it first.
    await log.flush()
    return json_response({"items": await log.recent(serial, limit)})


def add_routes(app: web.Application) -> None:
    """Register the rejection record's route."""
    app.router.add_get("/rejections", list_rejections)
