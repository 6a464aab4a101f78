"""Per-robot routes: the live feed and the history."""

from __future__ import annotations

import orjson
from aiohttp import web

from spotbox.api.downsample import downsampled_history
from spotbox.api.feeds import follow
from spotbox.api.params import bool_param, cursor_param, encode_cursor, int_param, serial_param, time_param
from spotbox.errors import BadRequestError, NotFoundError
from spotbox.keys import STORAGE
from spotbox.status import dumps
from spotbox.storage import HistoryQuery

HISTORY_LIMIT_DEFAULT = 500
HISTORY_LIMIT_MAX = 5000


async def feed(request: web.Request) -> web.StreamResponse:
    """GET /robots/{serial}/feed: each committed status of the robot as an SSE `status` event.

    With `Last-Event-ID`, the rows after it are replayed from storage first.
    """
    return await follow(request, serial_param(request))


async def history(request: web.Request) -> web.Response:
    """GET /robots/{serial}/history: one page of stored statuses in time order, with a cursor to the next."""
    serial = serial_param(request)
    start = time_param(request, "start_time")
    end = time_param(request, "end_time")
    if start is not None and end is not None and start > end:
        raise BadRequestError("start_time is after end_time", {"start_time": start, "end_time": end})
    if "interval" in request.query or "agg" in request.query:
        return await downsampled_history(request, serial, start, end)
    limit = int_param(request, "limit", HISTORY_LIMIT_DEFAULT, 1, HISTORY_LIMIT_MAX)
    include_payload = bool_param(request, "include_payload")
    after = cursor_param(request)
    storage = request.app[STORAGE]
    page = await storage.history_page(HistoryQuery(serial, start, end, after, limit), include_payload)
    if not page.count and after is None and not await storage.robot_exists(serial):
        raise NotFoundError("unknown robot", {"serial_number": serial})
    next_cursor = encode_cursor(*page.next_after) if page.next_after is not None else None
    # The items are JSON already (built where the rows were read); only the envelope is encoded here.
    body = {"serial_number": serial, "items": orjson.Fragment(page.items_json), "next_cursor": next_cursor}
    return web.Response(body=dumps(body), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the per-robot routes."""
    app.router.add_get("/robots/{serial}/feed", feed)
    app.router.add_get("/robots/{serial}/history", history)
