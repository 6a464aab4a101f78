"""Fixtures that start the real stack: spotbox on port 0, real SQLite files, a real PostgreSQL database.

Which database a test runs on (the suite stays under 90 s on 2 cores by design, not by skipping):

- `box`, `settings` and `database_url` run a test once on a real SQLite file and once on PostgreSQL, unless the
  test is marked `sqlite_only`: a whole file with `pytestmark = pytest.mark.sqlite_only`, or one test.
- The rule: a test runs on both databases when what it asserts depends on the storage backend: which rows are
  written, read back, in what order, deduplicated, aggregated, deleted, kept across a kill, a stop or an outage,
  acknowledged only once committed (storage, history, downsampling, feed replay, fleet listing, retention,
  ingest, redelivery, durability, shutdown, backpressure, readiness, `spotbox run` on a URL).
  What is decided before or without storage runs on SQLite only: MQTT protocol features, sessions, wills,
  routing, auth, limits, TLS, WebSocket, fuzzing, metrics, stats, SSE fan-out, examples, docs, and request
  parameters refused (400/413/422) before storage is asked anything.
  A new test in a `sqlite_only` file is SQLite only; a new file runs on both until it is marked.
- PostgreSQL for `database_url` is a new, empty schema (spotbox creates and migrates its tables there, for real)
  in one test database made per test session (per xdist worker): a schema costs milliseconds where a
  CREATE DATABASE and DROP DATABASE cost a fraction of a second on a busy server.
- `own_database_url` is `database_url` with a PostgreSQL database of its own (CREATE DATABASE): for tests of
  creating and migrating a truly empty database (tests/test_storage.py).
- A PostgreSQL test that cannot reach its server skips on a laptop and fails under CI=true (`unavailable`).
- Tests run in parallel processes (pytest-xdist, `-n auto` in pyproject; `-n 0` for one process): a test binds
  port 0, writes under tmp_path, names what it creates uniquely, and relies on no other test having run first.
- Waiting costs the whole suite: wait on events with generous timeouts, never on fixed sleeps, and shorten a
  setting (or inject a clock) rather than wait real seconds for an expiry.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from spotbox.app import create_app
from spotbox.bench import free_port
from spotbox.keys import BROKER, PIPELINE, STORAGE
from spotbox.mqtt.broker import Broker
from spotbox.pipeline import IngestPipeline
from spotbox.settings import Settings
from spotbox.storage import Storage

# Python caches what it compiles, in __pycache__ (ignored by git), even where the environment says not to
# (PYTHONDONTWRITEBYTECODE=1, as on this project's machines). Unset, every test worker rewrote every test module's
# asserts again at each run, and every `spotbox run` a test starts compiled spotbox's sources again: about 25 s
# of the suite's 130 s of CPU (2026-12-01). Set here, before the workers and those processes start, so that
# they inherit it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

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


def unavailable(reason: str) -> NoReturn:
    """Skip on a laptop without the tool or service; fail in CI, where everything must really run."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: required, not skipped)")
    pytest.skip(reason)


# The Debian package of each tool a test drives, where its name differs (.ci/run installs them all).
TOOL_PACKAGES = {"mosquitto_pub": "mosquitto-clients", "mosquitto_sub": "mosquitto-clients", "stdbuf": "coreutils"}


def require_tool(name: str) -> str:
    """Path of a command-line tool the test drives (mosquitto_pub, ...)."""
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {TOOL_PACKAGES.get(name, name)})")
    assert path is not None
    return path


async def admin_connection(url: str = PG_ADMIN_URL) -> asyncpg.Connection:
    """A connection to the test server; skipped (failed under CI=true) when it cannot be reached."""
    try:
        return await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {url} is not reachable: {exc}")


def postgres_url(database: str, **server_settings: str) -> str:
    """The test server's URL for `database`, with settings the server applies to each connection."""
    parts = urlsplit(PG_ADMIN_URL)
    query = [*parse_qsl(parts.query), *server_settings.items()]
    return urlunsplit(parts._replace(path=f"/{database}", query=urlencode(query)))


@asynccontextmanager
async def fresh_postgres_database(options: str = "") -> AsyncIterator[str]:
    """A new, empty PostgreSQL database on the test server (CREATE DATABASE `options`), dropped afterwards."""
    name = f"spotbox_test_{uuid.uuid4().hex[:12]}"
    admin = await admin_connection()
    try:
        await admin.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await admin.close()
    try:
        yield postgres_url(name)
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# The database that holds each test's schema: made by the first PostgreSQL test, dropped when the session ends.
_session_database: list[str] = []


async def _schema_test_database() -> str:
    if not _session_database:
        name = f"spotbox_test_{uuid.uuid4().hex[:12]}"
        admin = await admin_connection()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        _session_database.append(name)
    return _session_database[0]


async def _drop_session_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the session's schema database (no event loop runs at this point)."""
    for name in _session_database:
        asyncio.run(_drop_session_database(name))
    _session_database.clear()


@asynccontextmanager
async def fresh_postgres_schema() -> AsyncIterator[str]:
    """A URL whose connections see only a new, empty schema (search_path) of the session's test database."""
    database = await _schema_test_database()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = await admin_connection(postgres_url(database))
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        # application_name tags the test's connections, so that any left over can be ended before the drop.
        yield postgres_url(database, search_path=schema, application_name=schema)
    finally:
        try:
            await _drop_schema(admin, schema)
        finally:
            await admin.close()


async def _drop_schema(admin: asyncpg.Connection, schema: str) -> None:
    """End the test's leftover connections, then drop its schema.

    A terminated backend ends asynchronously: one still finishing a statement can deadlock with the DROP, which
    PostgreSQL then aborts. End them again and retry.
    """
    for attempt in range(5):
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", schema
        )
        try:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        except asyncpg.exceptions.DeadlockDetectedError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.2)
        else:
            return


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test that uses a database on both backends, or on SQLite only when marked `sqlite_only`."""
    backends = ["sqlite"] if metafunc.definition.get_closest_marker("sqlite_only") else BACKENDS
    for name in ("database_url", "own_database_url"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, backends, indirect=True)


@pytest.fixture
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A real SQLite file, or a new schema of a PostgreSQL database (see this module's docstring)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'spotbox.db'}"
    else:
        async with fresh_postgres_schema() as url:
            yield url


@pytest.fixture
async def own_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A real SQLite file, or a PostgreSQL database of its own, really empty (CREATE DATABASE)."""
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
    # Sent with `history()`: a login that may read, for an instance started with --users.
    read_headers: dict[str, str] = field(default_factory=dict)

    @property
    def mqtt_port(self) -> int:
        address = self.broker.mqtt_address
        assert address is not None
        return address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def broker(self) -> Broker:
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
            url = f"{self.base_url}/robots/{serial}/history"
            async with self.http.get(url, params=query, headers=self.read_headers) as resp:
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


@pytest.fixture
async def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    openssl = require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    proc = await asyncio.create_subprocess_exec(
        openssl,
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"),
        *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return cert, key


@pytest.fixture
async def secured(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox with the users file of tests/test_auth.py (robots and an operator); its `history()` reads as the
    operator (reads need a login with users)."""
    from tests.test_auth import operator_login, secured_settings  # noqa: PLC0415 - the users of those tests

    box = await make_box(secured_settings(tmp_path))
    box.read_headers = operator_login()
    return box


@pytest.fixture
async def private_postgres() -> AsyncIterator[Any]:
    """A running PostgreSQL server of the test's own, which it may stop (the machine's shared one never is)."""
    from tests.test_pg_outage import PrivatePostgres, server_binaries  # noqa: PLC0415 - its own module

    datadir = Path(tempfile.mkdtemp(prefix="spotbox-pg-"))
    server = PrivatePostgres(server_binaries(), datadir, free_port())
    try:
        await server.init()
        await server.start()
        yield server
    finally:
        if (datadir / "pgdata" / "postmaster.pid").exists():
            await server.stop("immediate")
        shutil.rmtree(datadir, ignore_errors=True)
