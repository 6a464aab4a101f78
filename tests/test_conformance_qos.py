"""Delivered QoS is the minimum of the published QoS and the subscription's granted QoS, on every path (live,
retained, status), on MQTT 3.1.1 and 5.0 [MQTT-3.8.4-6 (3.1.1), MQTT-3.8.4-8 (5.0)] (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance import VERSIONS, peer, start
from tests.conftest import Box, BoxFactory
from tests.helpers import payload, stamp


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite (delivery does not depend on the database)."""
    return await start(make_box, tmp_path)


@pytest.mark.parametrize("version", VERSIONS)
async def test_live_message_arrives_at_the_lower_qos(sbox: Box, version: str) -> None:
    """Test that each of 9 publish/grant QoS pairs is delivered once, at min(published, granted)."""
    async with peer(sbox.mqtt_port, version) as (sub, _), peer(sbox.mqtt_port, version) as (pub, _):
        assert await sub.subscribe(("q/0/#", 0), ("q/1/#", 1), ("q/2/#", 2)) == [0, 1, 2]
        for granted in range(3):
            for published in range(3):
                await pub.publish(f"q/{granted}/{published}", b"m", published)
        seen = {}
        for _ in range(9):
            delivery = await sub.next()
            seen[delivery.topic] = delivery.qos
            await sub.ack(delivery)
        assert await sub.silent_for(0.2)
    assert seen == {f"q/{g}/{p}": min(g, p) for g in range(3) for p in range(3)}


@pytest.mark.parametrize("version", VERSIONS)
async def test_retained_message_arrives_at_the_lower_qos(sbox: Box, version: str) -> None:
    """Test that retained messages published at QoS 0, 1, 2 reach a new QoS 1 subscription as QoS 0, 1, 1."""
    async with peer(sbox.mqtt_port, version) as (pub, _):
        for published in range(3):
            await pub.publish(f"kept/{published}", b"r", published, retain=True)
    for granted in range(3):
        async with peer(sbox.mqtt_port, version) as (sub, _):
            assert await sub.subscribe(("kept/#", granted)) == [granted]
            deliveries = [await sub.next() for _ in range(3)]
            for delivery in deliveries:
                await sub.ack(delivery)
            assert await sub.silent_for(0.1), "one retained message, one copy"
        assert {d.topic: (d.qos, d.retain) for d in deliveries} == {
            f"kept/{p}": (min(p, granted), True) for p in range(3)
        }, f"granted {granted}"


@pytest.mark.parametrize("version", VERSIONS)
async def test_status_arrives_at_the_lower_qos_and_is_stored(sbox: Box, version: str) -> None:
    """Test that a QoS 1 status reaches a QoS 2 subscriber as QoS 1 and a QoS 0 one as QoS 0, and is stored once."""
    async with (
        peer(sbox.mqtt_port, version) as (high, _),
        peer(sbox.mqtt_port, version) as (low, _),
        peer(sbox.mqtt_port, version) as (robot, _),
    ):
        assert await high.subscribe(("robot/+/status", 2)) == [2]
        assert await low.subscribe(("robot/+/status", 0)) == [0]
        assert await robot.publish("robot/QOS-1/status", payload(timestamp=stamp(1)), 1) == 0
        assert await robot.publish("robot/QOS-1/status", payload(timestamp=stamp(2)), 2) == 0
        from_high = [await high.next() for _ in range(2)]
        from_low = [await low.next() for _ in range(2)]
        for delivery in from_high:
            await high.ack(delivery)
    assert [d.qos for d in from_high] == [1, 2]
    assert [d.qos for d in from_low] == [0, 0]
    assert [item["ts"] for item in await sbox.history("QOS-1")] == [stamp(1), stamp(2)]
