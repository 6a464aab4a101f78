"""Liveness and readiness: /ready says not ready, and why, while storage or the MQTT listener is away."""

from __future__ import annotations

import asyncio

import pytest

from spotbox.errors import StorageUnavailableError
from tests.conftest import Box
from tests.helpers import mqtt_client, nth_status
from tests.test_durability import Outage


@pytest.mark.sqlite_only
async def test_health_answers(box: Box) -> None:
    """Test that /health answers 200 while the process runs."""
    async with box.http.get(f"{box.base_url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_ready_when_storage_and_broker_are_up(box: Box) -> None:
    """Test that /ready answers 200 with each check ok on a healthy box."""
    async with box.http.get(f"{box.base_url}/ready") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ready", "checks": {"storage": "ok", "broker": "ok"}}


async def test_not_ready_while_writes_fail(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that /ready answers 503 naming storage while the writer retries a failing write, and 200 after."""
    outage = Outage(box.storage, monkeypatch)
    async with mqtt_client(box.mqtt_port) as robot:
        publish = asyncio.create_task(robot.publish("robot/ROBOT-RDY/status", nth_status(1), qos=1))
        async with asyncio.timeout(10):
            await outage.retried.wait()
        async with box.http.get(f"{box.base_url}/ready") as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["error"] == "not ready"
        assert body["detail"]["storage"].startswith("unavailable")
        assert body["detail"]["broker"] == "ok"
        outage.down = False
        async with asyncio.timeout(10):
            await publish
    async with box.http.get(f"{box.base_url}/ready") as resp:
        assert resp.status == 200


async def test_not_ready_when_database_does_not_answer(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that /ready answers 503 when the database does not answer its ping."""

    async def ping() -> None:
        raise StorageUnavailableError("injected: connection refused")

    monkeypatch.setattr(box.storage, "ping", ping)
    async with box.http.get(f"{box.base_url}/ready") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["detail"]["storage"] == "unavailable: injected: connection refused"


@pytest.mark.sqlite_only
async def test_not_ready_when_mqtt_stops_listening(box: Box) -> None:
    """Test that /ready answers 503 naming the broker once the MQTT listener is closed."""
    await box.broker.stop_listening()
    async with box.http.get(f"{box.base_url}/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["detail"] == {"storage": "ok", "broker": "not listening"}
