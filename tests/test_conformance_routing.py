"""MQTT 5 routing extras: one copy for overlapping subscriptions at the highest granted QoS with every matching
subscription identifier [MQTT-3.3.4-2, 3.3.4-3, 3.3.4-5]; server-to-client topic aliases within the client's Topic
Alias Maximum [MQTT-3.3.2-9]; PUBLISH properties on every path, status topics included, where a status with properties
is validated on its payload alone (issue 10)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conformance import VERSIONS, Delivery, peer, start
from tests.conftest import Box, BoxFactory
from tests.helpers import payload, stamp

PROPERTIES: dict[str, Any] = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "application/json",
    "response_topic": "robot/P1/reply",
    "correlation_data": b"req-1",
    "user_properties": [("b", "2"), ("a", "1"), ("b", "1")],
}


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite."""
    return await start(make_box, tmp_path)


def carried(delivery: Delivery) -> dict[str, Any]:
    """The properties of PROPERTIES that a delivery carries (the expiry as 'counting down from 3600')."""
    assert delivery.v5 is not None
    found = {name: getattr(delivery.v5, name) for name in PROPERTIES}
    expiry = found["message_expiry_interval"]
    found["message_expiry_interval"] = 3600 if expiry is not None and 3590 <= expiry <= 3600 else expiry
    return found


@pytest.mark.parametrize("version", VERSIONS)
async def test_overlapping_subscriptions_deliver_one_copy(sbox: Box, version: str) -> None:
    """Test that a QoS 2 message matching three subscriptions of one client (QoS 0, 1, 2) comes once, at QoS 2, and
    on MQTT 5 with the identifiers of the two that have one."""
    async with peer(sbox.mqtt_port, version) as (sub, _), peer(sbox.mqtt_port, version) as (publisher, _):
        ids = [1, 2] if version == "5" else [None, None]
        assert await sub.subscribe(("o/+/c", 1), sub_id=ids[0]) == [1]
        assert await sub.subscribe(("o/#", 2), sub_id=ids[1]) == [2]
        assert await sub.subscribe(("o/b/c", 0)) == [0]
        await publisher.publish("o/b/c", b"once", 2)
        await publisher.publish("o/marker", b"marker", 1)
        copies = await sub.received()
    assert [(d.payload, d.qos) for d in copies] == [(b"once", 2)]
    if version == "5":
        assert copies[0].v5 is not None
        assert sorted(copies[0].v5.subscription_ids) == [1, 2]


async def test_server_uses_topic_aliases_within_the_clients_maximum(sbox: Box) -> None:
    """Test that a client allowing 2 topic aliases gets repeated topics as aliases (empty topic) no higher than 2,
    resolving to the topics published, and a client allowing none never gets one."""
    topics = ["ta/a", "ta/b", "ta/a", "ta/c", "ta/b", "ta/a", "ta/a"]
    async with (
        peer(sbox.mqtt_port, "5", topic_alias_max=2) as (aliased, _),
        peer(sbox.mqtt_port, "5") as (plain, _),
        peer(sbox.mqtt_port, "5") as (publisher, _),
    ):
        for sub in (aliased, plain):
            assert await sub.subscribe(("ta/#", 0)) == [0]
        for topic in topics:
            await publisher.publish(topic, topic.encode(), 0)
        from_aliased = [await aliased.next() for _ in topics]
        from_plain = [await plain.next() for _ in topics]
    aliases: dict[int, str] = {}
    resolved = []
    for delivery in from_aliased:
        assert delivery.v5 is not None
        alias = delivery.v5.topic_alias
        if alias is not None:
            assert 1 <= alias <= 2
            if delivery.topic:
                aliases[alias] = delivery.topic
        resolved.append(delivery.topic or aliases[alias or 0])
    assert resolved == topics
    assert any(not d.topic for d in from_aliased), "no topic was ever sent as an alias alone"
    assert all(d.v5 is not None and d.v5.topic_alias is None for d in from_plain)
    assert [d.topic for d in from_plain] == topics


@pytest.mark.parametrize("name", list(PROPERTIES))
async def test_status_with_a_property_is_accepted_and_stored(sbox: Box, name: str) -> None:
    """Test that a valid QoS 1 status carrying one PUBLISH property is acknowledged with 0x00 and stored."""
    async with peer(sbox.mqtt_port, "5") as (robot, _):
        assert await robot.publish("robot/P1/status", payload(timestamp=stamp(1)), 1, **{name: PROPERTIES[name]}) == 0
    assert [item["ts"] for item in await sbox.history("P1")] == [stamp(1)]


async def test_status_properties_reach_mqtt5_subscribers(sbox: Box) -> None:
    """Test that a QoS 2 status with every property gets PUBREC 0x00, its properties reach a live MQTT 5 subscriber
    of robot/+/status (user properties in order), a 3.1.1 subscriber gets the same payload; the status is stored."""
    body = payload(timestamp=stamp(2))
    async with peer(sbox.mqtt_port, "5") as (new, _), peer(sbox.mqtt_port, "3.1.1") as (old, _):
        assert await new.subscribe(("robot/+/status", 1)) == [1]
        assert await old.subscribe(("robot/+/status", 1)) == [1]
        async with peer(sbox.mqtt_port, "5") as (robot, _):
            assert await robot.publish("robot/P1/status", body, 2, **PROPERTIES) == 0
        delivered = await new.next()
        assert (delivered.payload, carried(delivered)) == (body, PROPERTIES)
        assert (await old.next()).payload == body
    assert [item["ts"] for item in await sbox.history("P1")] == [stamp(2)]


@pytest.mark.parametrize(
    "path",
    [
        "live",
        "retained",
        "queued",
        "shared",
        "resent",
    ],
)
async def test_properties_reach_mqtt5_subscribers_on_every_path(sbox: Box, path: str) -> None:
    """Test that a message's properties, user properties in order, come with it live, retained, from an offline
    queue, through a shared subscription and when resent on reconnect."""
    port = sbox.mqtt_port
    filters = {"shared": "$share/g/pp/#"}
    client_id = f"props-{path}"
    async with peer(port, "5", client_id, clean=False) as (sub, _):
        if path != "retained":
            assert await sub.subscribe((filters.get(path, "pp/#"), 1)) == [1]
        if path == "queued":
            await sub.disconnect()
        async with peer(port, "5") as (publisher, _):
            assert await publisher.publish("pp/x", b"m", 1, retain=path == "retained", **PROPERTIES) == 0
        if path == "retained":
            assert await sub.subscribe(("pp/#", 1)) == [1]
        if path not in ("queued",):
            delivered = await sub.next()
            if path != "resent":
                await sub.ack(delivered)
    if path in ("queued", "resent"):
        async with peer(port, "5", client_id, clean=False) as (sub, _), peer(port, "5") as (publisher, _):
            await publisher.publish("pp/marker", b"marker", 1)
            [delivered] = await sub.received()
    assert delivered.payload == b"m"
    assert carried(delivered) == PROPERTIES
