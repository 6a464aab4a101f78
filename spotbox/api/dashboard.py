"""The dashboard at GET /: plain HTML, CSS and one script, shipped inside the package and served by spotbox."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from spotbox.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Revalidate on each visit (ETag/Last-Modified answer 304) so an upgraded spotbox never runs a stale cached script.
_HEADERS = {"Cache-Control": "no-cache"}


async def index(request: web.Request) -> web.FileResponse:
    """GET /: the fleet dashboard page; it loads everything else from the API."""
    return web.FileResponse(STATIC_DIR / "index.html", headers=_HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    """GET /static/{name}: one of the dashboard's files; only names in the package's static folder are served."""
    name = request.match_info["name"]
    path = STATIC_DIR / name
    # Names come from a listing of the folder, never from joining user input into a path that is then trusted.
    if name not in {entry.name for entry in STATIC_DIR.iterdir() if entry.is_file()}:
        raise NotFoundError("no such dashboard file", {"name": name})
    return web.FileResponse(path, headers=_HEADERS)


async def favicon(request: web.Request) -> web.FileResponse:
    """GET /favicon.ico: the console's icon (an SVG, which every current browser takes at this address too)."""
    return web.FileResponse(STATIC_DIR / "favicon.svg", headers={**_HEADERS, "Content-Type": "image/svg+xml"})


def add_routes(app: web.Application) -> None:
    """Register the page and its static files."""
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/static/{name}", static_file)
