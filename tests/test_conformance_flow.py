"""MQTT 5 flow control, both ways: never more unacknowledged QoS 1/2 PUBLISHes to a client than its Receive Maximum
[MQTT-3.3.4-9]; the server's own Receive Maximum (`receive_maximum`, default 100) announced in CONNACK and enforced
with DISCONNECT 0x93 [MQTT-3.3.4-7, 3.3.4-8] (issue 10)."""

from __future__ import annotations

from pathlib import Path

import mqtt5
import pytest

from tests.conformance import peer, start
from tests.conftest import Box, BoxFactory
from tests.mqtt5_clients import wire_client


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite with its default options."""
    return await start(make_box, tmp_path)


async def test_no_more_in_flight_than_the_clients_receive_maximum(sbox: Box) -> None:
    """Test that a client with Receive Maximum 2 has at most 2 unacknowledged QoS 1 and 2 messages, gets the next
    one when it completes one, and finally all 5 in order."""
    async with (
        peer(sbox.mqtt_port, "5", receive_max=2) as (sub, _),
        peer(sbox.mqtt_port, "5") as (publisher, _),
    ):
        assert await sub.subscribe(("f/#", 2)) == [2]
        for n in range(5):
            assert await publisher.publish(f"f/{n}", b"m", 1 + n % 2) == 0
        window = [await sub.next(), await sub.next()]
        assert await sub.silent_for(0.3)
        await sub.ack(window.pop(0))
        window.append(await sub.next())
        assert await sub.silent_for(0.3), sub.unexpected
        for delivery in window:
            await sub.ack(delivery)
        rest = [await sub.next() for _ in range(2)]
    assert [d.topic for d in window + rest] == [f"f/{n}" for n in range(1, 5)]


async def test_connack_announces_receive_maximum_100(sbox: Box) -> None:
    """Test that by default CONNACK announces Receive Maximum 100."""
    async with wire_client(sbox.mqtt_port) as (_, connack):
        assert connack.receive_max == 100


async def test_more_unreleased_qos2_than_receive_maximum_is_disconnect_0x93(
    make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that with receive_maximum 3 a fourth QoS 2 PUBLISH awaiting PUBREL gets DISCONNECT 0x93 and is never
    delivered, while others keep publishing."""
    box = await start(make_box, tmp_path, receive_maximum=3)
    async with peer(box.mqtt_port, "5") as (watcher, _), peer(box.mqtt_port, "5") as (flood, _):
        assert await watcher.subscribe(("fl/#", 2)) == [2]
        for n in range(1, 4):
            await flood.send(mqtt5.PublishPacket(f"fl/{n}", b"x", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=n))
            assert (await flood.expect(mqtt5.PubRecPacket)).packet_id == n
        await flood.send(mqtt5.PublishPacket("fl/over", b"x", qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=4))
        disconnect = await flood.expect(mqtt5.DisconnectPacket)
        assert disconnect.reason_code == mqtt5.DisconnectReasonCode.RECEIVE_MAX_EXCEEDED
        await flood.closed()
        async with peer(box.mqtt_port, "5") as (other, _):
            await other.publish("fl/marker", b"marker", 1)
        assert "fl/over" not in [d.topic for d in await watcher.received()]
