"""MQTT 5.0 session ends on spotbox's broker: the Will Delay Interval and a finite Session Expiry Interval, as bare
codec clients see them on the wire [MQTT-3.1.2-23, 3.1.3-9, 3.14.2.2.2].

Waiting is by message order, never by the clock: a second will with a longer delay, or a marker published at once,
shows whether the first will came (or the session had expired) by then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import mqtt5
import pytest

from tests.conftest import Box
from tests.helpers import mqtt_client
from tests.mqtt5_clients import Wire, wire_client
from tests.test_mqtt5_options import plain, publish, subscribe

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

PERSISTENT = {"clean_start": False, "session_expiry_interval": 60}


def will(topic: str, delay: int) -> mqtt5.Will:
    """A will on `topic` (its payload is the topic) published `delay` seconds after the connection is lost."""
    return mqtt5.Will(topic, payload=topic.encode(), will_delay_interval=delay)


async def drop(port: int, client_id: str, delay: int, topic: str) -> None:
    """Connect a persistent client with a delayed will, then lose its connection (no DISCONNECT)."""
    async with wire_client(port, client_id=client_id, will=will(topic, delay), **PERSISTENT):
        pass


async def next_payload(wire: Wire) -> bytes:
    """The payload of the next PUBLISH."""
    return (await wire.expect(mqtt5.PublishPacket)).payload


@pytest.fixture
def port(box: Box) -> int:
    """The MQTT port."""
    return box.mqtt_port


async def test_will_waits_for_its_delay(port: int) -> None:
    """Test that a will with a delay is published after a message sent once the connection was lost."""
    async with wire_client(port) as (watcher, _), wire_client(port) as (other, _):
        await subscribe(watcher, plain("robot/W1/+"))
        await drop(port, "delayed-will", 1, "robot/W1/lwt")
        await publish(other, "robot/W1/marker", b"marker")
        assert [await next_payload(watcher) for _ in range(2)] == [b"marker", b"robot/W1/lwt"]


@asynccontextmanager
async def come_back(port: int, version: str, clean_start: bool) -> AsyncIterator[None]:
    """Connect again as "comes-back", with MQTT 5 or 3.1.1, resuming its session unless `clean_start`."""
    if version == "5":
        async with wire_client(port, client_id="comes-back", **{**PERSISTENT, "clean_start": clean_start}) as (_, ack):
            assert ack.session_present is not clean_start
            yield
    else:
        async with mqtt_client(port, "3.1.1", identifier="comes-back", clean_session=clean_start):
            yield


@pytest.mark.parametrize(
    ("version", "clean_start", "first_will"),
    [
        ("5", False, b"robot/W2/b"),
        ("5", True, b"robot/W2/a"),
        ("3.1.1", False, b"robot/W2/b"),
        ("3.1.1", True, b"robot/W2/a"),
    ],
)
async def test_reconnecting_before_the_delay_cancels_the_will(
    port: int, version: str, clean_start: bool, first_will: bytes
) -> None:
    """Test that coming back before the will delay cancels the will, and a clean start publishes it at once."""
    async with wire_client(port) as (watcher, _), wire_client(port) as (other, _):
        await subscribe(watcher, plain("robot/W2/+"))
        await drop(port, "comes-back", 2, "robot/W2/a")
        await publish(other, "robot/W2/marker", b"marker")  # the broker has seen the connection end by now
        assert await next_payload(watcher) == b"marker"
        async with come_back(port, version, clean_start):
            # A will due a second later than a's would have been: it comes first only if a's is never published.
            await drop(port, "stays-away", 3, "robot/W2/b")
            assert await next_payload(watcher) == first_will


@pytest.mark.parametrize(
    ("on_connect", "on_disconnect", "will_delay", "kept"),
    [(1, None, None, False), (60, 1, None, False), (60, 0, None, False), (1, 60, None, True), (3, None, 2, True)],
)
async def test_session_is_discarded_after_its_expiry(
    port: int, on_connect: int, on_disconnect: int | None, will_delay: int | None, kept: bool
) -> None:
    """Test that a disconnected session expires after its interval (from CONNECT or DISCONNECT), not before."""
    session = {"client_id": "expiring", "session_expiry_interval": on_connect}
    # A will dropped by a normal DISCONNECT: its delay must not shorten the session's life.
    dropped_will = will("robot/E1/unused", will_delay) if will_delay is not None else None
    async with wire_client(port, **session, will=dropped_will) as (wire, _):
        await subscribe(wire, plain("robot/E1/cmd"))
        await wire.send(mqtt5.DisconnectPacket(session_expiry_interval=on_disconnect))
    async with wire_client(port) as (watcher, _):
        await subscribe(watcher, plain("robot/E1/lwt"))
        # This will goes 2 s after its connection is lost: later than a 1 s expiry, before a 3 s or 60 s one.
        await drop(port, "clock", 2, "robot/E1/lwt")
        assert await next_payload(watcher) == b"robot/E1/lwt"
    async with wire_client(port, **{**session, "clean_start": False}) as (_, connack):
        assert connack.session_present is kept
