"""GET /robots and GET /robots/{serial}: every robot seen, with its latest status by ts and when it was last seen."""

from __future__ import annotations

import asyncio

import pytest

from spotbox.storage.sqlite import SQLiteStorage
from tests.conftest import Box
from tests.helpers import mqtt_client, payload
from tests.test_history_api import get, seed


async def test_robots_lists_each_robot_with_its_latest_status(box: Box) -> None:
    """Test that /robots has each robot once, by serial, with the row of greatest ts, and the latest receive time."""
    await seed(box, "R2", [1, 5, 3])
    await seed(box, "R1", [2])
    # On SQLite, rows written straight to storage were not received since this start: presence is not known yet.
    # On PostgreSQL the instance follows the shared table (rows another instance stored), so it learns of them as
    # statuses received elsewhere once its follower has read them: received days ago, the robots are offline.
    on_sqlite = isinstance(box.storage, SQLiteStorage)
    async with asyncio.timeout(10):
        while True:
            status, body = await get(box, "/robots")
            if on_sqlite or "unknown" not in [item["presence"] for item in body["items"]]:
                break
            await asyncio.sleep(0.05)
    assert status == 200
    assert [item["serial_number"] for item in body["items"]] == ["R1", "R2"]
    for item, minute in zip(body["items"], ["02", "05"], strict=True):
        history = await box.history(item["serial_number"])
        newest = max(history, key=lambda row: (row["ts"], row["id"]))
        assert item["latest"] == newest
        assert item["latest"]["ts"] == f"2026-11-22T10:{minute}:00Z"
        assert (
            item["last_seen"] == history[-1]["received_at"]
            if minute == "02"
            else max(r["received_at"] for r in history)
        )
        assert set(item) == {
            *("serial_number", "last_seen", "latest", "presence", "presence_since", "registered"),
            *("name", "model", "site", "tags"),
        }
        assert item["presence"] == ("unknown" if on_sqlite else "offline")
        assert item["registered"] is False


async def test_empty_fleet_is_an_empty_list(box: Box) -> None:
    """Test that before any status arrives, /robots answers 200 with no items."""
    assert await get(box, "/robots") == (200, {"items": []})


async def test_one_robot_follows_what_mqtt_commits(box: Box) -> None:
    """Test that /robots/{serial} is the latest status by ts: a newer one replaces it, an older one does not, but
    moves `last_seen`, the latest receive time."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/ROBOT-F1/status", payload(timestamp="2026-11-22T10:00:00Z"), qos=1)
        status, first = await get(box, "/robots/ROBOT-F1")
        assert status == 200
        await robot.publish("robot/ROBOT-F1/status", payload(timestamp="2026-11-22T10:05:00Z", battery_level=7), qos=1)
        _, newer = await get(box, "/robots/ROBOT-F1")
        # A late, older status (a robot emptying its buffer) is stored but is not the latest.
        await robot.publish("robot/ROBOT-F1/status", payload(timestamp="2026-11-22T09:00:00Z", battery_level=3), qos=1)
        _, after_old = await get(box, "/robots/ROBOT-F1")
    assert first["latest"]["battery_level"] == 80
    assert newer["latest"]["battery_level"] == 7
    assert newer["latest"]["ts"] == "2026-11-22T10:05:00Z"
    assert after_old["latest"] == newer["latest"]
    assert newer["serial_number"] == "ROBOT-F1"
    assert newer["last_seen"] == newer["latest"]["received_at"]
    late = next(row for row in await box.history("ROBOT-F1") if row["battery_level"] == 3)
    assert after_old["last_seen"] == late["received_at"] > newer["last_seen"]
    _, fleet = await get(box, "/robots")
    # Presence moves on as the connection ends (tests/test_presence.py); the rest is unchanged.
    assert newer["presence"] == "online"
    moving = ("presence", "presence_since")
    assert [{k: v for k, v in item.items() if k not in moving} for item in fleet["items"]] == [
        {k: v for k, v in after_old.items() if k not in moving}
    ]


async def test_unknown_robot_is_404(box: Box) -> None:
    """Test that a robot never seen is a 404 in the one error shape."""
    await seed(box, "R1", [1])
    status, body = await get(box, "/robots/NEVER-SEEN")
    assert status == 404
    assert body == {"error": "unknown robot", "detail": {"serial_number": "NEVER-SEEN"}}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("serial", ["a" * 65, "bad%20serial", "semi;colon"])
async def test_bad_serial_is_400(box: Box, serial: str) -> None:
    """Test that a serial that cannot be a robot's is a 400 naming the pattern."""
    status, body = await get(box, f"/robots/{serial}")
    assert status == 400
    assert body["error"] == "invalid serial number"
    assert body["detail"]["pattern"] == "[A-Za-z0-9_.-]{1,64}"
