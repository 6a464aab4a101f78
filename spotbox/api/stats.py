"""GET /stats: the last hour of ingest, MQTT and HTTP alike, from the pipeline's in-memory window."""

from __future__ import annotations

from aiohttp import web

from spotbox.keys import PIPELINE, SHARED_STATS


async def stats(request: web.Request) -> web.Response:
    """GET /stats: received, valid and rejected statuses by reason over the last hour, in all and per robot."""
    shared = request.app.get(SHARED_STATS)  # on PostgreSQL: every instance sharing the database
    body = await shared.snapshot_json() if shared is not None else request.app[PIPELINE].window.snapshot_json()
    return web.Response(body=body, content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register the statistics route."""
    app.router.add_get("/stats", stats)
