"""Backpressure instead of loss: when statuses cannot be committed, spotbox stops reading publishers' sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from spotbox.broker.handler import READ_WINDOW
from spotbox.loadgen import connect_packet, mqtt_string, publish_packet
from spotbox.settings import Settings
from tests.conftest import BoxFactory
from tests.test_durability import Outage, nth_status

CONNACK_OK = b"\x20\x02\x00\x00"


class RawPublisher:
    """An MQTT 3.1.1 publisher on a bare socket: it writes QoS 1 PUBLISH packets and counts PUBACKs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: str) -> None:
        self.reader = reader
        self.writer = writer
        self.topic = mqtt_string(f"robot/{serial}/status")

    async def publish(self, numbers: range) -> None:
        """Write one QoS 1 PUBLISH per number (the status `nth_status(n)`, packet id n + 1) without waiting."""
        for n in numbers:
            self.writer.write(publish_packet(self.topic, n + 1, nth_status(n), 1))
        await self.writer.drain()

    async def acked_ids(self, count: int) -> set[int]:
        """Read `count` PUBACKs; the packet ids they acknowledge."""
        ids: set[int] = set()
        for _ in range(count):
            header = await self.reader.readexactly(4)
            assert header[:2] == b"\x40\x02", header
            ids.add(struct.unpack("!H", header[2:])[0])
        return ids


@asynccontextmanager
async def raw_publisher(port: int, serial: str) -> AsyncIterator[RawPublisher]:
    """A connected RawPublisher, disconnected at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(f"raw-{serial}"))
    assert await reader.readexactly(4) == CONNACK_OK
    try:
        yield RawPublisher(reader, writer, serial)
    finally:
        writer.write(b"\xe0\x00")
        writer.close()


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
    """Test that a publisher whose statuses cannot be committed is read no further than READ_WINDOW, then loses none."""
    # A queue with room for everything: here the connection's own window is what stops the reading.
    box = await make_box(dataclasses.replace(settings, batch_max=5))
    outage = Outage(box.storage, monkeypatch)
    sent = READ_WINDOW * 3
    async with raw_publisher(box.mqtt_port, "ROBOT-WIN") as robot:
        await robot.publish(range(sent))
        await until(lambda: box.pipeline.stats.received == READ_WINDOW and box.broker.paused_connections == 1)
        # Paused: no PUBLISH past the window is read until a commit frees a slot, and none is acknowledged.
        assert box.pipeline.stats.received == READ_WINDOW
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
        await first.publish(range(20))
        # The writer holds one batch while storage is down; once 5 more fill the queue, reading stops.
        await until(lambda: box.pipeline.full and box.broker.paused_connections == 1)
        read = box.pipeline.stats.received
        assert read < 20
        await second.publish(range(100, 110))
        await until(lambda: box.broker.paused_connections == 2)
        assert box.pipeline.stats.received == read, "a publisher was read while the queue was full"
        outage.down = False
        async with asyncio.timeout(20):
            assert await first.acked_ids(20) == set(range(1, 21))
            assert await second.acked_ids(10) == set(range(101, 111))
    assert len(await box.history("ROBOT-FILL")) == 20
    assert len(await box.history("ROBOT-WAIT")) == 10
    assert box.pipeline.stats.stored == 30
