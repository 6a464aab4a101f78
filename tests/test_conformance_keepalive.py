"""Keep alive: a client silent for one and a half times its keep alive is disconnected and its will published, on
MQTT 3.1.1 and 5.0 [MQTT-3.1.2-24 (3.1.1), MQTT-3.1.2-22 (5.0)]; an MQTT 5 client is told the Server Keep Alive when
`max_keepalive` caps its own [MQTT-3.2.2-21] (issue 10)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from spotbox.mqtt import broker
from tests.conformance import Peer, peer, start
from tests.conftest import BoxFactory
from tests.mqtt5_clients import wire_client


async def seconds_until_closed(client: Peer) -> float:
    """How long the server keeps a connection that sends nothing (at most 3 s)."""
    started = time.monotonic()
    await client.closed(3.0)
    return time.monotonic() - started


async def ping_every(client: Peer, seconds: float, count: int) -> None:
    """Send PINGREQ `count` times, `seconds` apart, and expect a PINGRESP to each (3.1.1)."""
    for _ in range(count):
        await client.send(b"\xc0\x00")
        assert await client.expect(tuple) == (0xD0, b"")
        await asyncio.sleep(seconds)


@pytest.mark.parametrize("chunk", [broker.TICK_CHUNK, 1])
async def test_silent_client_is_disconnected_and_its_will_published(
    make_box: BoxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Test that 3.1.1 and MQTT 5 clients silent with a 1 s keep alive are closed after about 1.5 s and their wills
    published, while a client pinging every 0.4 s stays connected; also when the clock looks at each connection in
    a turn of the event loop of its own (as it does past TICK_CHUNK connections)."""
    monkeypatch.setattr(broker, "TICK_CHUNK", chunk)
    box = await start(make_box, tmp_path)
    async with (
        peer(box.mqtt_port, "5") as (watcher, _),
        peer(box.mqtt_port, "3.1.1", keep_alive=1, will=("ka/old", b"gone")) as (old, _),
        peer(box.mqtt_port, "5", keep_alive=1, will=("ka/new", b"gone")) as (new, _),
        peer(box.mqtt_port, "3.1.1", keep_alive=1) as (pinging, _),
    ):
        assert await watcher.subscribe(("ka/#", 0)) == [0]
        pings = asyncio.create_task(ping_every(pinging, 0.4, 7))
        waited = await asyncio.gather(seconds_until_closed(old), seconds_until_closed(new))
        assert all(1.0 <= seconds <= 3.0 for seconds in waited), waited
        assert sorted([(await watcher.next()).topic for _ in range(2)]) == ["ka/new", "ka/old"]
        await pings  # every PINGREQ answered: still connected at 2.8 s


async def test_server_keep_alive_caps_the_clients(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that with max_keepalive 1 a client asking 60 s (or none) is told Server Keep Alive 1 and is closed once
    silent for 1.5 s, its will published."""
    box = await start(make_box, tmp_path, max_keepalive=1)
    for asked in (0, 60):
        async with wire_client(box.mqtt_port, keep_alive=asked) as (_, connack):
            assert connack.server_keep_alive == 1
    async with (
        peer(box.mqtt_port, "5") as (watcher, _),
        peer(box.mqtt_port, "5", keep_alive=60, will=("ka/capped", b"gone")) as (silent, _),
    ):
        assert await watcher.subscribe(("ka/#", 0)) == [0]
        assert 1.0 <= await seconds_until_closed(silent) <= 3.0
        assert (await watcher.next()).topic == "ka/capped"
