"""A QoS 1/2 resend (DUP) of a status is stored once, with or without a timestamp, across reconnects too."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import orjson
import pytest

from spotbox.mqtt import publish
from tests.conftest import Box
from tests.helpers import payload, raw_publisher

UNSTAMPED = payload(timestamp=...)


@pytest.mark.parametrize("body", [payload(), UNSTAMPED], ids=["timestamped", "unstamped"])
async def test_dup_resend_is_stored_once(box: Box, body: bytes) -> None:
    """Test that a PUBLISH resent with DUP and the same packet id is acknowledged again but stored once."""
    async with raw_publisher(box.mqtt_port, "ROBOT-DUP") as robot, asyncio.timeout(10):
        await robot.publish(7, body)
        assert await robot.acked_ids(1) == {7}
        await robot.publish(7, body, dup=True)
        assert await robot.acked_ids(1) == {7}
    assert len(await box.history("ROBOT-DUP")) == 1
    assert box.pipeline.stats.duplicates == 1


async def test_dup_resend_after_reconnect_is_stored_once(box: Box) -> None:
    """Test that an unstamped status resent with DUP after a reconnect (persistent session) is stored once."""
    async with raw_publisher(box.mqtt_port, "ROBOT-RE", client_id="robot-re", clean=False) as robot:
        await robot.publish(3, UNSTAMPED)
        async with asyncio.timeout(10):
            assert await robot.acked_ids(1) == {3}
    async with raw_publisher(box.mqtt_port, "ROBOT-RE", client_id="robot-re", clean=False) as robot:
        await robot.publish(3, UNSTAMPED, dup=True)
        async with asyncio.timeout(10):
            assert await robot.acked_ids(1) == {3}
    assert len(await box.history("ROBOT-RE")) == 1


async def test_new_unstamped_status_is_not_a_duplicate(box: Box) -> None:
    """Test that without DUP, a second unstamped status (same payload, reused packet id) is a new row."""
    async with raw_publisher(box.mqtt_port, "ROBOT-TWICE") as robot, asyncio.timeout(10):
        await robot.publish(5, UNSTAMPED)
        assert await robot.acked_ids(1) == {5}
        await robot.publish(5, UNSTAMPED)
        assert await robot.acked_ids(1) == {5}
    rows = await box.history("ROBOT-TWICE", include_payload="true")
    assert len(rows) == 2
    assert rows[0]["ts"] != rows[1]["ts"], "an unstamped status takes its receive time as ts"
    assert all(row["payload"] == orjson.loads(UNSTAMPED) for row in rows)


async def test_dup_with_other_payload_is_a_new_status(box: Box) -> None:
    """Test that a DUP-flagged publish whose payload differs from the one first sent under that id is stored."""
    other = payload(timestamp=..., battery_level=12)
    async with raw_publisher(box.mqtt_port, "ROBOT-OTHER") as robot, asyncio.timeout(10):
        await robot.publish(9, UNSTAMPED)
        assert await robot.acked_ids(1) == {9}
        await robot.publish(9, other, dup=True)
        assert await robot.acked_ids(1) == {9}
    assert [row["battery_level"] for row in await box.history("ROBOT-OTHER")] == [80, 12]


async def test_dup_long_after_the_first_is_a_new_status(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a DUP matching a receive time older than the resend window is stored as a new status: the client
    may have reused the packet id for a new, identical status that never arrived."""
    monkeypatch.setattr(publish, "UNSTAMPED_MAX_AGE", timedelta(0))
    async with raw_publisher(box.mqtt_port, "ROBOT-LATE") as robot, asyncio.timeout(10):
        await robot.publish(4, UNSTAMPED)
        assert await robot.acked_ids(1) == {4}
        await robot.publish(4, UNSTAMPED, dup=True)
        assert await robot.acked_ids(1) == {4}
    assert len(await box.history("ROBOT-LATE")) == 2
