"""The rejection record: refused statuses kept in their own bounded table and served at GET /rejections."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from spotbox.keys import OPS
from tests.conftest import Box
from tests.helpers import mqtt_client, payload


async def rejections(box: Box, **params: str) -> list[dict[str, object]]:
    async with box.http.get(f"{box.base_url}/rejections", params=params) as resp:
        assert resp.status == 200
        items: list[dict[str, object]] = (await resp.json())["items"]
        return items


async def test_rejections_are_recorded_with_field_reason_and_payload_start(box: Box) -> None:
    """Test on both backends that a refused MQTT status is in /rejections (newest first), never in the history."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/BAD-1/status", payload(battery_level=150), qos=1)
        await robot.publish("robot/BAD-1/status", b"{" + b"x" * 10_000, qos=1)
        await robot.publish("robot/OTHER/status", payload(driving_status="FLYING"), qos=1)
    async with asyncio.timeout(10):
        while len(await rejections(box)) < 3:  # noqa: ASYNC110 - polled over HTTP, as a client would
            await asyncio.sleep(0.02)
    first, second = await rejections(box, serial="BAD-1")
    assert (first["field"], first["payload_truncated"]) == ("payload", True)
    assert first["payload"] == "{" + "x" * 4095
    assert second["field"] == "battery_level"
    assert second["reason"] == "battery_level: 150 is greater than the maximum of 100"
    assert '"battery_level":150' in str(second["payload"])
    assert [r["serial_number"] for r in await rejections(box, limit="1")] == ["OTHER"]
    assert await box.history("BAD-1") == []
    async with box.http.get(f"{box.base_url}/rejections", params={"limit": "0"}) as resp:
        assert resp.status == 400


async def test_a_flood_is_capped_per_robot(box: Box) -> None:
    """Test that a robot sending many bad statuses keeps only its newest `rejections_kept` rows."""
    log = box.server.app[OPS].rejections
    log.per_robot = 5
    pipeline = box.pipeline
    for n in range(40):
        pipeline.check("FLOOD", payload(battery_level=200 + n))
    pipeline.check("QUIET", payload(battery_level=0))
    await log.flush()
    kept = await rejections(box, serial="FLOOD", limit="100")
    assert [r["reason"] for r in kept] == [
        f"battery_level: {200 + n} is greater than the maximum of 100" for n in range(39, 34, -1)
    ]
    assert len(await rejections(box, serial="QUIET")) == 1


async def test_rejection_record_is_bounded_in_all_and_by_age(box: Box) -> None:
    """Test that the record keeps at most `total` rows across robots, and retention deletes the old ones."""
    log = box.server.app[OPS].rejections
    log.total = 10
    for n in range(25):
        box.pipeline.check(f"MANY-{n:02d}", payload(battery_level=0))
    await log.flush()
    kept = await rejections(box, limit="100")
    assert [r["serial_number"] for r in kept] == [f"MANY-{n:02d}" for n in range(24, 14, -1)]
    assert await log.delete_before(datetime.now(UTC) + timedelta(seconds=1)) == 10
    assert await rejections(box) == []
