"""Every query parameter of every GET route: bad values are a 400 in the error shape, never a 5xx."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.test_storage import record

OPENAPI = Path(__file__).parent.parent / "spotbox" / "api" / "openapi.json"
SERIAL = "PROP-1"


def cursor_of(text: str) -> str:
    """A cursor as the server encodes one, around any text."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# Values that once made a route answer 500 (issue 11, item 12), and their neighbours.
EDGES = [
    "",
    "0",
    "-1",
    "1",
    "5000",
    "5001",
    "9" * 5000,
    str(2**63),
    str(2**63 - 1),
    str(-(2**63) - 1),
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "2026-11-22T10:00:00Z",
    "2026-11-22T10:00:00",
    "true",
    "no",
    "1m",
    "0s",
    "9" * 5000 + "s",
    "3651d",
    "avg",
    "last",
    "count",
    cursor_of(f"0:{2**63}"),
    cursor_of(f"{10**30}:1"),
    cursor_of(f"{-(10**30)}:1"),
    cursor_of("1:" + "9" * 5000),
    cursor_of("1:-1"),
    "\x00",
    "%",
    "\u2603",
]
EDGE_VALUES = st.sampled_from(EDGES)
VALUES = st.one_of(EDGE_VALUES, EDGE_VALUES, EDGE_VALUES, st.text(max_size=40))


def get_routes() -> list[tuple[str, list[str], bool]]:
    """Each GET path of the OpenAPI description with its query parameter names, and whether it takes a header."""
    spec = json.loads(OPENAPI.read_text())
    shared = spec["components"]["parameters"]
    routes = []
    for path, item in spec["paths"].items():
        if "get" not in item:
            continue
        params = [shared[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p for p in item["get"].get("parameters", [])]
        query = [p["name"] for p in params if p["in"] == "query"]
        header = any(p["in"] == "header" for p in params)
        routes.append((path, query, header))
    return routes


ROUTES = get_routes()
# Routes with query parameters are drawn more often: they are where bad values go.
WITH_PARAMETERS = [route for route in ROUTES if route[1]]


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, str], dict[str, str]]:
    """A GET of one route with any subset of its query parameters, each any value, maybe Last-Event-ID."""
    path, names, header = draw(
        st.sampled_from(ROUTES) | st.sampled_from(WITH_PARAMETERS) | st.sampled_from(WITH_PARAMETERS)
    )
    serial = draw(st.sampled_from([SERIAL, SERIAL, SERIAL, "NEVER-SEEN"]) | st.text(min_size=1, max_size=70))
    path = path.replace("{serial}", quote(serial, safe=""))
    query = draw(st.fixed_dictionaries({}, optional=dict.fromkeys(names, VALUES)))
    # aiohttp refuses a request line over 8,190 bytes itself, before any route: one 5,000-digit value at a time.
    assume(len(urlencode(query)) < 7000)
    headers = {}
    if header and draw(st.booleans()):
        headers["Last-Event-ID"] = draw(st.sampled_from(EDGES).filter(str.isascii).filter(str.isprintable))
    return path, query, headers


@pytest.fixture
async def sqlite_box(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite with a few statuses of one robot."""
    settings = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}", batch_wait_ms=1)
    box = await make_box(settings)
    await box.storage.write_batch([record(SERIAL, minute) for minute in range(5)])
    return box


async def status_of(box: Box, path: str, query: dict[str, str], headers: dict[str, str]) -> tuple[int, Any]:
    """The status of one GET, and its JSON body unless it is a stream or a page."""
    async with box.http.get(f"{box.base_url}{path}", params=query, headers=headers) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, None


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ({"cursor": cursor_of(f"0:{2**63}")}, "cursor is not one this server issued"),
        ({"start_time": "0001-01-01T00:00:00+01:00"}, "start_time is outside the years 1 to 9999 in UTC"),
        ({"end_time": "9999-12-31T23:59:59-01:00"}, "end_time is outside the years 1 to 9999 in UTC"),
        ({"interval": "9" * 5000 + "s"}, "interval must be a whole number of s, m, h or d, from 1s to 3650d (e.g. 1m)"),
    ],
)
async def test_former_500s_are_400s(sqlite_box: Box, query: dict[str, str], error: str) -> None:
    """Test that the parameters that once crashed the history route are a 400 naming the parameter."""
    status, body = await status_of(sqlite_box, f"/robots/{SERIAL}/history", query, {})
    assert status == 400
    assert body["error"] == error
    assert set(body) == {"error", "detail"}


async def test_each_edge_value_of_each_parameter_is_below_500(sqlite_box: Box) -> None:
    """Test every edge value in every query parameter (and Last-Event-ID) of every GET route, one at a time."""
    for template, names, header in ROUTES:
        path = template.replace("{serial}", SERIAL)
        for value in EDGES:
            cases: list[tuple[dict[str, str], dict[str, str]]] = [({name: value}, {}) for name in names]
            if header and value.isascii() and value.isprintable():
                cases.append(({}, {"Last-Event-ID": value}))
            for query, headers in cases:
                status, body = await status_of(sqlite_box, path, query, headers)
                assert status < 500, (path, query, headers, body)
                if status >= 400:
                    assert set(body) == {"error", "detail"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
async def test_no_query_parameter_gets_a_5xx(
    sqlite_box: Box, request: tuple[str, dict[str, str], dict[str, str]]
) -> None:
    """Test that any value of any query parameter of any GET route is answered below 500, errors in the one shape."""
    path, query, headers = request
    status, body = await status_of(sqlite_box, path, query, headers)
    assert status < 500, (path, query, headers, body)
    if status >= 400:
        assert set(body) == {"error", "detail"}
