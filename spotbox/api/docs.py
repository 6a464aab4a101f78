"""The API described (GET /openapi.json, an OpenAPI 3.1 data file) and browsable (GET /docs, offline)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

HERE = Path(__file__).parent
OPENAPI_PATH = HERE / "openapi.json"
DOCS_PAGE_PATH = HERE / "docs.html"


def add_routes(app: web.Application) -> None:
    """Register /openapi.json and /docs; both files are read once, here."""
    document = OPENAPI_PATH.read_bytes()
    page = DOCS_PAGE_PATH.read_bytes()

    async def openapi(_: web.Request) -> web.Response:
        """GET /openapi.json: the description of every route."""
        return web.Response(body=document, content_type="application/json")

    async def docs(_: web.Request) -> web.Response:
        """GET /docs: a self-contained page that renders /openapi.json."""
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
