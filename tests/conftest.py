"""Fixtures that start the real stack: spotbox on port 0, real SQLite files, a real PostgreSQL database."""

from __future__ import annotations

import gc
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from spotbox.app import create_app
from spotbox.broker import SpotboxBroker
from spotbox.keys import BROKER, PIPELINE, STORAGE
from spotbox.pipeline import IngestPipeline
from spotbox.settings import Settings
from spotbox.storage import Storage

PG_ADMIN_URL = os.environ.get("SPOTBOX_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The console script a user runs, from the environment the tests run in.
SPOTBOX = str(Path(sys.executable).parent / "spotbox")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport() -> Iterator[None]:
    """No garbage collection while pytest builds a test's report. On CPython 3.11.7 a finalizer the collector runs in
    the middle of pytest's ast.parse of a failed (or expected-to-fail) test's source raises SystemError "AST
    constructor recursion depth mismatch" (CPython gh-106905, fixed in 3.11.8), which ends the whole run with
    INTERNALERROR."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def unavailable(reason: str) -> None:
    """Skip on a laptop without the tool or service; fail in CI, where everything must really run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required, not skipped)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of a command-line tool the test drives (mosquitto_pub, ...)."""
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if path is None:
        unavailable(f"{name} is not installed (apt-get install mosquitto mosquitto-clients)")
    assert path is not None
    return path


@asynccontextmanager
async def fresh_postgres_database(options: str = "") -> AsyncIterator[str]:
    """A new, empty PostgreSQL database on the test server (CREATE DATABASE `options`), dropped afterwards."""
    name = f"spotbox_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(PG_ADMIN_URL)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test that uses it runs once on a real SQLite file and once on a real PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'spotbox.db'}"
    else:
        async with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    """Settings for a test instance: every port 0, a short batch wait."""
    return Settings(http_port=0, mqtt_port=0, database_url=database_url, batch_wait_ms=1.0, sse_ping_s=1.0)


@dataclass
class Box:
    """A running spotbox: its app, its real ports, and an HTTP client for it."""

    server: TestServer
    http: aiohttp.ClientSession

    @property
    def mqtt_port(self) -> int:
        address = self.broker.mqtt_address
        assert address is not None
        return address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def broker(self) -> SpotboxBroker:
        return self.server.app[BROKER]

    @property
    def storage(self) -> Storage:
        return self.server.app[STORAGE]

    @property
    def pipeline(self) -> IngestPipeline:
        return self.server.app[PIPELINE]

    async def history(self, serial: str, **params: str) -> list[dict[str, Any]]:
        """Every stored status of `serial`, following cursors."""
        items: list[dict[str, Any]] = []
        query = dict(params)
        while True:
            async with self.http.get(f"{self.base_url}/robots/{serial}/history", params=query) as resp:
                if resp.status == 404:
                    return items
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            items.extend(page["items"])
            if page["next_cursor"] is None:
                return items
            query["cursor"] = page["next_cursor"]


BoxFactory = Callable[[Settings], Awaitable[Box]]


@pytest.fixture
async def make_box() -> AsyncIterator[BoxFactory]:
    """Start spotbox instances with given settings; all are stopped at the end of the test."""
    started: list[Box] = []

    async def start(settings: Settings) -> Box:
        server = TestServer(create_app(settings), host="127.0.0.1", port=0)
        await server.start_server()
        box = Box(server, aiohttp.ClientSession())
        started.append(box)
        return box

    yield start
    for box in reversed(started):
        await box.http.close()
        await box.server.close()


@pytest.fixture
async def box(make_box: BoxFactory, settings: Settings) -> Box:
    """spotbox running on port 0 over the parametrized database."""
    return await make_box(settings)
