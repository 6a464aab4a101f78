"""GET /forward: each store-and-forward target's link state, cursor and lag."""

from __future__ import annotations

from aiohttp import web

from spotbox.keys import FORWARDERS
from spotbox.status import dumps


async def forward_state(request: web.Request) -> web.Response:
    """GET /forward: `{"targets": [...]}`, empty when spotbox forwards nowhere."""
    targets = [forwarder.state() for forwarder in request.app[FORWARDERS]]
    return web.Response(body=dumps({"targets": targets}), content_type="application/json")


def add_routes(app: web.Application) -> None:
    """Register /forward."""
    app.router.add_get("/forward", forward_state)
