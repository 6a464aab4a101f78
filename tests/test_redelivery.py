"""A QoS 1/2 resend (DUP) of a status is stored once, with or without a timestamp, across reconnects too."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from spotbox.mqtt import publish
from spotbox.settings import Settings
from spotbox.storage import base as storage_base
from tests.conftest import Box, BoxFactory
from tests.helpers import payload, raw_publisher
from tests.test_cli import start_spotbox
from tests.test_durability import history_ts

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
    monkeypatch.setattr(storage_base, "RESEND_WINDOW", timedelta(0))
    async with raw_publisher(box.mqtt_port, "ROBOT-LATE") as robot, asyncio.timeout(10):
        await robot.publish(4, UNSTAMPED)
        assert await robot.acked_ids(1) == {4}
        await robot.publish(4, UNSTAMPED, dup=True)
        assert await robot.acked_ids(1) == {4}
    assert len(await box.history("ROBOT-LATE")) == 2


async def test_dup_resend_after_a_restart_is_stored_once(make_box: BoxFactory, settings: Settings) -> None:
    """Test that an unstamped status whose PUBACK was lost, resent with DUP to a restarted spotbox, is stored once;
    a new status with the same payload and packet id, without DUP, is still a new row."""
    first = await make_box(settings)
    async with raw_publisher(first.mqtt_port, "ROBOT-CRASH", client_id="robot-crash", clean=False) as robot:
        await robot.publish(11, UNSTAMPED)
        async with asyncio.timeout(10):
            # Committed; the robot never reads this PUBACK (lost in the crash) and will resend.
            assert await robot.acked_ids(1) == {11}
    await first.server.close()
    second = await make_box(settings)
    async with raw_publisher(second.mqtt_port, "ROBOT-CRASH", client_id="robot-crash", clean=False) as robot:
        await robot.publish(11, UNSTAMPED, dup=True)
        async with asyncio.timeout(10):
            assert await robot.acked_ids(1) == {11}
        assert len(await second.history("ROBOT-CRASH")) == 1
        assert second.pipeline.stats.duplicates == 1
        # An idle robot repeating itself: same payload, same packet id, no DUP: a new status.
        await robot.publish(11, UNSTAMPED)
        async with asyncio.timeout(10):
            assert await robot.acked_ids(1) == {11}
    assert len(await second.history("ROBOT-CRASH")) == 2


async def test_dup_from_another_client_is_a_new_status(box: Box) -> None:
    """Test that a DUP resend matches only the delivery of the same client id, not an equal payload of another."""
    async with raw_publisher(box.mqtt_port, "ROBOT-TWO", client_id="first-client") as robot, asyncio.timeout(10):
        await robot.publish(2, UNSTAMPED)
        assert await robot.acked_ids(1) == {2}
    async with raw_publisher(box.mqtt_port, "ROBOT-TWO", client_id="second-client") as robot, asyncio.timeout(10):
        await robot.publish(2, UNSTAMPED, dup=True)
        assert await robot.acked_ids(1) == {2}
    assert len(await box.history("ROBOT-TWO")) == 2


async def test_dup_resend_after_kill_9_is_stored_once(tmp_path: Path) -> None:
    """Test with `spotbox run` killed by SIGKILL after committing an unstamped status: its DUP resend to the
    restarted process is stored once."""
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", f"sqlite:///{tmp_path / 'spotbox.db'}")
    first = await start_spotbox(*args)
    try:
        async with raw_publisher(first.mqtt_port, "ROBOT-K9", client_id="robot-k9", clean=False) as robot:
            await robot.publish(21, UNSTAMPED)
            async with asyncio.timeout(10):
                assert await robot.acked_ids(1) == {21}
            first.proc.kill()
            async with asyncio.timeout(10):
                await first.proc.wait()
    finally:
        if first.proc.returncode is None:
            first.proc.kill()
            await first.proc.wait()
    second = await start_spotbox(*args)
    try:
        async with raw_publisher(second.mqtt_port, "ROBOT-K9", client_id="robot-k9", clean=False) as robot:
            await robot.publish(21, UNSTAMPED, dup=True)
            async with asyncio.timeout(10):
                assert await robot.acked_ids(1) == {21}
        stored = await history_ts(f"http://127.0.0.1:{second.http_port}", "ROBOT-K9")
    finally:
        second.proc.terminate()
        await second.proc.wait()
    assert len(stored) == 1
