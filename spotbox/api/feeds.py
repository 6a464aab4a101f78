"""Live feeds over SSE: one robot's, or the whole fleet's (the dashboard's source), resumable by Last-Event-ID."""

from __future__ import annotations

from aiohttp import web

from spotbox.api.params import last_event_id_param
from spotbox.keys import HUB, SETTINGS, STORAGE
from spotbox.sse import Replay, serve_feed


async def follow(request: web.Request, serial_number: str | None) -> web.StreamResponse:
    """Stream the committed statuses of one robot (None: of every robot) to the client.

    With `Last-Event-ID`, the rows after it are replayed from storage first, then the live ones follow.
    """
    after = last_event_id_param(request)
    with request.app[HUB].subscribe(serial_number) as stream:
        replay = Replay(request.app[STORAGE], serial_number, after) if after is not None else None
        return await serve_feed(request, stream, request.app[SETTINGS].sse_ping_s, replay)


async def fleet_feed(request: web.Request) -> web.StreamResponse:
    """GET /feed: `status` events (id = row id) of every robot and `rejected` events (no id).

    Rejections are not stored, so a resuming client gets the missed statuses but only live rejections.
    """
    return await follow(request, None)


def add_routes(app: web.Application) -> None:
    """Register the fleet feed."""
    app.router.add_get("/feed", fleet_feed)
