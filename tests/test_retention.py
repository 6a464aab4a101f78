"""Retention: rows older than --retention-days go in bounded batches, at start and on a schedule; ingest goes on."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from spotbox.cli import main
from spotbox.errors import StorageUnavailableError
from spotbox.keys import RETENTION
from spotbox.retention import Retention
from spotbox.settings import DatabaseURL, Settings
from spotbox.storage import open_storage
from spotbox.storage.postgres import PostgresStorage
from spotbox.storage.sqlite import SQLiteStorage
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, payload
from tests.test_cli import one_line_error, run_spotbox, spotbox_process
from tests.test_storage import record_at

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=1)


async def seed(database_url: str, old: dict[str, int], recent: Sequence[str]) -> None:
    """Store `old[serial]` statuses 40 days old and one a day old for each of `recent`, before spotbox starts."""
    store = open_storage(DatabaseURL.parse(database_url))
    await store.open()
    try:
        await store.write_batch(
            [record_at(serial, OLD + timedelta(seconds=n)) for serial, count in old.items() for n in range(count)]
        )
        await store.write_batch([record_at(serial, RECENT) for serial in recent])
    finally:
        await store.close()


def retention_of(box: Box) -> Retention:
    """The running retention component of `box`."""
    return box.server.app[RETENTION]


def stamp_of(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def test_old_rows_go_in_bounded_batches_and_recent_rows_stay(make_box: BoxFactory, settings: Settings) -> None:
    """Test that the pass at start deletes every row older than the period, 5 per statement, and nothing newer."""
    await seed(settings.database_url, {"R1": 9, "R2": 9, "R3": 9}, ["R1", "R2", "R3"])
    box = await make_box(dataclasses.replace(settings, retention_days=30, retention_batch=5))
    retention = retention_of(box)
    async with asyncio.timeout(20):
        await retention.wait_passes(1)
    assert retention.last is not None
    assert (retention.last.deleted, retention.last.statements) == (27, 6)
    for serial in ("R1", "R2", "R3"):
        assert [item["ts"] for item in await box.history(serial)] == [stamp_of(RECENT)]


async def test_passes_repeat_on_schedule_while_ingest_goes_on(make_box: BoxFactory, settings: Settings) -> None:
    """Test that later passes delete statuses ingested old after start, while recent ones from MQTT and HTTP stay."""
    box = await make_box(dataclasses.replace(settings, retention_days=30, retention_interval_s=0.05))
    retention = retention_of(box)
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/R1/status", payload(timestamp=stamp_of(OLD)), qos=1)
        await robot.publish("robot/R1/status", payload(timestamp=stamp_of(NOW)), qos=1)
    for moment in (OLD, NOW):
        async with box.http.post(f"{box.base_url}/robots/R2/status", data=payload(timestamp=stamp_of(moment))) as resp:
            assert resp.status == 202
    # Two passes that began after both were committed.
    async with asyncio.timeout(20):
        await retention.wait_passes(retention.passes + 2)
    for serial in ("R1", "R2"):
        assert [item["ts"] for item in await box.history(serial)] == [stamp_of(NOW)]


def hook_deletes(monkeypatch: pytest.MonkeyPatch, before: Callable[[int], Awaitable[None]]) -> None:
    """Run `before(n)` ahead of the n-th DELETE statement (from 1), at the storage seam of both backends."""
    calls = 0
    for backend in (SQLiteStorage, PostgresStorage):
        real: Callable[..., Awaitable[int]] = backend.delete_before

        async def delete_before(store: Any, cutoff: datetime, limit: int, real: Any = real, **kw: Any) -> int:
            nonlocal calls
            calls += 1
            await before(calls)
            result: int = await real(store, cutoff, limit, **kw)
            return result

        monkeypatch.setattr(backend, "delete_before", delete_before)


async def test_ingest_is_served_between_two_batches(
    make_box: BoxFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that while a pass is under way, between two of its batches, MQTT and HTTP statuses are committed."""
    between, release = asyncio.Event(), asyncio.Event()

    async def pause_before_the_second(call: int) -> None:
        if call == 2:
            between.set()
            await release.wait()

    hook_deletes(monkeypatch, pause_before_the_second)
    await seed(settings.database_url, {"R1": 30}, [])
    box = await make_box(dataclasses.replace(settings, retention_days=30, retention_batch=10))
    retention = retention_of(box)
    async with asyncio.timeout(20):
        await between.wait()
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/R2/status", payload(timestamp=stamp_of(NOW)), qos=1)
        async with box.http.post(f"{box.base_url}/robots/R3/status", data=payload(timestamp=stamp_of(NOW))) as resp:
            assert resp.status == 202
    assert retention.passes == 0
    assert len(await box.history("R1")) == 20
    assert len(await box.history("R2")) == len(await box.history("R3")) == 1
    release.set()
    async with asyncio.timeout(20):
        await retention.wait_passes(1)
    assert retention.last is not None
    assert (retention.last.deleted, retention.last.statements) == (30, 4)
    assert await box.history("R1") == []


async def test_failed_pass_is_logged_and_the_next_one_runs(
    make_box: BoxFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that a pass that meets a storage outage logs a warning, and the schedule carries on and deletes."""
    await seed(settings.database_url, {"R1": 3}, ["R1"])

    async def fail_the_first(call: int) -> None:
        if call == 1:
            raise StorageUnavailableError("injected outage")

    hook_deletes(monkeypatch, fail_the_first)
    caplog.set_level(logging.WARNING, logger="spotbox.retention")
    box = await make_box(dataclasses.replace(settings, retention_days=30, retention_interval_s=0.05))
    retention = retention_of(box)
    async with asyncio.timeout(20):
        await retention.wait_passes(2)
    assert any("retention pass failed" in line and "injected outage" in line for line in caplog.messages)
    assert [item["ts"] for item in await box.history("R1")] == [stamp_of(RECENT)]


async def test_no_retention_unless_asked(box: Box) -> None:
    """Test that by default rows are kept forever: no retention task is started."""
    assert RETENTION not in box.server.app


async def test_retention_days_from_the_environment(database_url: str) -> None:
    """Test that SPOTBOX_RETENTION_DAYS reaches `spotbox run`, which deletes old rows at start and says so."""
    await seed(database_url, {"R1": 4}, ["R1"])
    env = {"SPOTBOX_RETENTION_DAYS": "30", "DATABASE_URL": database_url}
    async with spotbox_process("--mqtt-port", "0", "--http-port", "0", env=env) as process:
        assert process.proc.stderr is not None
        async with asyncio.timeout(20):
            while b"retention deleted" not in (line := await process.proc.stderr.readline()):
                assert line, b"".join(process.log).decode()
        assert b"retention deleted 4 statuses" in line
        url = f"http://127.0.0.1:{process.http_port}/robots/R1/history"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            items = (await resp.json())["items"]
    assert [item["ts"] for item in items] == [stamp_of(RECENT)]


@pytest.mark.parametrize(("args", "env"), [(["--retention-days", "0"], {}), ([], {"SPOTBOX_RETENTION_DAYS": "-3"})])
async def test_retention_days_must_be_positive(args: list[str], env: dict[str, str]) -> None:
    """Test that a retention of zero or fewer days, as option or variable, stops spotbox with one line."""
    proc = await run_spotbox("--mqtt-port", "0", "--http-port", "0", *args, env=env)
    async with asyncio.timeout(20):
        _, stderr = await proc.communicate()
    assert proc.returncode == 1
    assert "--retention-days: " in one_line_error(stderr)
    assert "is not a positive number of days" in one_line_error(stderr)


def test_help_shows_the_retention_default() -> None:
    """Test that `spotbox run --help` documents --retention-days, its variable's default: keep forever."""
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "--retention-days" in result.output
    assert "keep forever" in result.output
