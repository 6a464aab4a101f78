"""Backpressure instead of loss: when statuses cannot be committed, spotbox stops reading publishers' sockets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from spotbox.settings import Settings
from tests.conftest import BoxFactory
from tests.helpers import raw_publisher
from tests.test_durability import Outage
from tests.test_metrics import scrape


async def until(condition: Callable[[], bool]) -> None:
    """Wait (up to 10 s) until `condition()` holds, checking between event-loop turns."""
    async with asyncio.timeout(10):
        # The conditions read plain counters the broker keeps; there is no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@pytest.fixture
def small_queue(settings: Settings) -> Settings:
    """A queue and batch of 5 statuses, so a test can fill them."""
    return dataclasses.replace(settings, queue_size=5, batch_max=5)


async def test_connection_window_pauses_reading(
    make_box: BoxFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a 3.1.1 publisher whose statuses cannot be committed is read no further than --receive-maximum,
    then loses none."""
    # A queue with room for everything: here the connection's own window is what stops the reading.
    box = await make_box(dataclasses.replace(settings, batch_max=5, receive_maximum=40))
    outage = Outage(box.storage, monkeypatch)
    sent = 40 * 3
    async with raw_publisher(box.mqtt_port, "ROBOT-WIN") as robot:
        await robot.publish_many(range(sent))
        await until(lambda: box.pipeline.stats.received == 40 and box.broker.paused_connections == 1)
        # Paused: no PUBLISH past the window is read until a commit frees a slot, and none is acknowledged.
        assert box.pipeline.stats.received == 40
        outage.down = False
        async with asyncio.timeout(20):
            acked = await robot.acked_ids(sent)
    assert acked == set(range(1, sent + 1))
    assert box.pipeline.stats.received == sent
    assert len(await box.history("ROBOT-WIN", limit="5000")) == sent


async def test_full_queue_pauses_reading(
    make_box: BoxFactory, small_queue: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a full ingest queue stops spotbox reading other publishers, and that nothing is dropped."""
    box = await make_box(small_queue)
    outage = Outage(box.storage, monkeypatch)
    async with (
        raw_publisher(box.mqtt_port, "ROBOT-FILL") as first,
        raw_publisher(box.mqtt_port, "ROBOT-WAIT") as second,
    ):
        await first.publish_many(range(20))
        # The writer holds one batch while storage is down; once 5 more fill the queue, reading stops.
        await until(lambda: box.pipeline.full and box.broker.paused_connections == 1)
        read = box.pipeline.stats.received
        assert read < 20
        await second.publish_many(range(100, 110))
        await until(lambda: box.broker.paused_connections == 2)
        assert box.pipeline.stats.received == read, "a publisher was read while the queue was full"
        metrics = await scrape(box)
        assert metrics["spotbox_mqtt_connections_paused"] == 2
        assert metrics["spotbox_queue_depth"] == 5
        outage.down = False
        async with asyncio.timeout(20):
            assert await first.acked_ids(20) == set(range(1, 21))
            assert await second.acked_ids(10) == set(range(101, 111))
    assert len(await box.history("ROBOT-FILL")) == 20
    assert len(await box.history("ROBOT-WAIT")) == 10
    assert box.pipeline.stats.stored == 30
