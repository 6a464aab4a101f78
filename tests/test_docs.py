"""GET /openapi.json describes every route and is valid OpenAPI 3.1; GET /docs renders it offline."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
from aiohttp import encode_basic_auth, web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory, require_tool
from tests.helpers import mqtt_client, payload, stamp
from tests.test_auth import PASSWORDS, secured_settings

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

# Every HTTP route of spotbox (README's HTTP API), including those other parts of spotbox add.
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
    ("post", "/robots"),
    ("patch", "/robots/{serial}"),
    ("delete", "/robots/{serial}"),
    ("get", "/alerts"),
    ("get", "/alerts/{id}"),
    ("post", "/alerts/{id}/ack"),
    ("get", "/rejections"),
}
# MQTT over WebSocket is a protocol endpoint and the dashboard's files are its own, not HTTP API routes.
UNDOCUMENTED = {"/mqtt", "/static/{name}", "/favicon.ico"}


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


# Real requests, one or more for each documented JSON answer, with the status each must get.
REAL_ANSWERS = [
    ("get", "/robots", None, 200),
    ("get", "/robots/R1", None, 200),
    ("get", "/robots/NEVER-SEEN", None, 404),
    ("get", "/robots/bad!serial", None, 400),
    ("post", "/robots/R1/status", payload(timestamp=stamp(30)), 202),
    ("post", "/robots/R1/status", payload(battery_level=150), 422),
    ("post", "/robots/R1/status", b"{not json", 400),
    ("post", "/robots/R1/status", b" " * (1024 * 1024 + 1), 413),
    ("get", "/robots/R1/history", None, 200),
    ("get", "/robots/R1/history?include_payload=true&limit=1", None, 200),
    ("get", "/robots/R1/history?interval=1m&agg=avg", None, 200),
    ("get", "/robots/R1/history?interval=1m&agg=last", None, 200),
    ("get", "/robots/R1/history?interval=1m&agg=count", None, 200),
    ("get", "/robots/R1/history?limit=0", None, 400),
    ("get", "/stats", None, 200),
    ("get", "/health", None, 200),
    ("get", "/ready", None, 200),
    ("post", "/robots", b'{"serial_number": "REG-1", "site": "berlin", "tags": ["a"]}', 201),
    ("post", "/robots", b'{"serial_number": "REG-1"}', 409),
    ("post", "/robots", b'{"serial_number": "REG-2", "colour": "red"}', 400),
    ("patch", "/robots/REG-1", b'{"name": "Forklift"}', 200),
    ("patch", "/robots/NOT-REGISTERED", b'{"name": "x"}', 404),
    ("get", "/robots/REG-1", None, 200),
    ("get", "/robots?presence=online&site=berlin", None, 200),
    ("post", "/robots/LOW/status", payload(battery_level=5), 202),
    ("get", "/alerts", None, 200),
    ("get", "/alerts?state=open&serial=LOW", None, 200),
    ("get", "/alerts?state=burning", None, 400),
    ("get", "/alerts/no-such-alert", None, 404),
    ("post", "/alerts/no-such-alert/ack", None, 404),
    ("get", "/rejections", None, 200),
    ("get", "/rejections?limit=0", None, 400),
]


def response_schema(document: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any]:
    """The documented JSON schema of one answer, with the document's components beside it for its $refs."""
    for template, item in document["paths"].items():
        if re.fullmatch(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)), path) and method in item:
            answer = item[method]["responses"][str(status)]
            if "$ref" in answer:
                answer = document["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
            schema: dict[str, Any] = answer["content"]["application/json"]["schema"]
            return {**schema, "components": document["components"]}
    raise AssertionError(f"{method.upper()} {path} is not documented")


async def test_real_answers_match_the_documented_schemas(box: Box) -> None:
    """Test that what each route really answers (successes and errors) validates against /openapi.json."""
    document = await fetch_openapi(box)
    async with mqtt_client(box.mqtt_port) as robot:
        for n in range(3):
            await robot.publish("robot/R1/status", payload(timestamp=stamp(n)), qos=1)
    for method, target, body, status in REAL_ANSWERS:
        await check_real_answer(box, document, method, target, status, body)


async def check_real_answer(
    box: Box, document: dict[str, Any], method: str, target: str, status: int, body: bytes | None, **kwargs: Any
) -> None:
    """Send one request, check its status, and validate its JSON answer against the documented schema."""
    # A file-like body: aiohttp warns about large bytes bodies, and sends this one with its Content-Length too.
    data = io.BytesIO(body) if body is not None else None
    async with box.http.request(method, f"{box.base_url}{target}", data=data, **kwargs) as resp:
        assert resp.status == status, (method, target, await resp.text())
        answer = await resp.json()
    path = target.split("?", 1)[0]
    errors = list(Draft202012Validator(response_schema(document, method, path, status)).iter_errors(answer))
    assert not errors, (method, target, answer, [error.message for error in errors])


# With --users: (who posts, with what password, for which robot) and the status each must get.
SECURED_ANSWERS = [
    (None, None, "ROBOT-A", 401),
    ("ROBOT-A", "wrong", "ROBOT-A", 401),
    ("ROBOT-A", PASSWORDS["ROBOT-A"], "ROBOT-B", 403),
    ("ROBOT-A", PASSWORDS["ROBOT-A"], "ROBOT-A", 202),
]


async def test_real_secured_answers_match_the_documented_schemas(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that the login answers of POST /robots/{serial}/status (401, 403) and its 202 match /openapi.json."""
    box = await make_box(secured_settings(tmp_path))
    document = await fetch_openapi(box)
    security = document["paths"]["/robots/{serial}/status"]["post"]["security"]
    assert {"basicAuth": []} in security
    scheme = document["components"]["securitySchemes"]["basicAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "basic")
    for name, password, serial, status in SECURED_ANSWERS:
        headers = {"Authorization": encode_basic_auth(name, password or "")} if name else {}
        body = payload(timestamp=stamp(1))
        await check_real_answer(box, document, "post", f"/robots/{serial}/status", status, body, headers=headers)
