"""GET /openapi.json describes every route and is valid OpenAPI 3.1; GET /docs renders it offline."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory, require_tool

# Every route of SPEC section 6 and the HTTP contract, including those other parts of spotbox add.
DOCUMENTED = {
    ("get", "/"),
    ("get", "/robots"),
    ("get", "/robots/{serial}"),
    ("post", "/robots/{serial}/status"),
    ("get", "/robots/{serial}/feed"),
    ("get", "/robots/{serial}/history"),
    ("get", "/feed"),
    ("get", "/stats"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
}
# MQTT over WebSocket is a protocol endpoint, not an HTTP API route.
UNDOCUMENTED = {"/mqtt", "/static/{name}"}  # MQTT over WebSocket; the dashboard's own files


@pytest.fixture
async def sqlite_box(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on a SQLite file: the API description does not depend on the backend."""
    return await make_box(Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}"))


async def fetch_openapi(box: Box) -> dict[str, Any]:
    async with box.http.get(f"{box.base_url}/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
    return document


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(method, path) of every operation the document describes."""
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {(method, path) for path, item in document["paths"].items() for method in item if method in methods}


async def test_openapi_is_valid_and_describes_every_route(sqlite_box: Box) -> None:
    """Test that /openapi.json is valid OpenAPI 3.1 and has an operation for each route the app registers."""
    document = await fetch_openapi(sqlite_box)
    validate(document)
    assert document["openapi"].startswith("3.1.")
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in sqlite_box.server.app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not isinstance(route.resource, web.StaticResource)
        and route.resource.canonical not in UNDOCUMENTED
    }
    assert registered, "the app registers routes"
    assert registered <= operations(document)
    assert operations(document) >= DOCUMENTED


async def test_openapi_error_answers_use_the_error_shape(sqlite_box: Box) -> None:
    """Test that every 4xx/5xx answer the document describes is a JSON object with `error` and `detail`."""
    document = await fetch_openapi(sqlite_box)
    schemas = document["components"]["schemas"]
    responses = document["components"]["responses"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for code, described in operation["responses"].items():
                if int(code) < 400:
                    continue
                answer = responses[described["$ref"].rsplit("/", 1)[1]] if "$ref" in described else described
                schema = answer["content"]["application/json"]["schema"]
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
                assert set(schema["required"]) == {"error", "detail"}, (method, path, code)


async def test_docs_page_loads_openapi_offline(sqlite_box: Box) -> None:
    """Test that /docs is an HTML page that fetches /openapi.json and loads nothing from another host."""
    docs_url = f"{sqlite_box.base_url}/docs"
    async with sqlite_box.http.get(docs_url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    fetched = re.findall(r"""fetch\(\s*["']([^"']+)["']""", page)
    assert [urljoin(docs_url, url) for url in fetched] == [f"{sqlite_box.base_url}/openapi.json"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no CDN: the page must work offline"


async def test_docs_page_renders_every_operation_in_a_browser(sqlite_box: Box, tmp_path: Path) -> None:
    """Test that headless Chromium, running the page's script, shows every documented operation."""
    chromium = require_tool("chromium")
    document = await fetch_openapi(sqlite_box)
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        f"{sqlite_box.base_url}/docs",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        dom, err = await proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    html = dom.decode()
    assert 'id="error" hidden=""' in html, "the page reported an error loading openapi.json"
    shown = set(re.findall(r'<span class="method (\w+)">\w+</span><span class="path">([^<]+)</span>', html))
    assert shown == operations(document)
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in html
