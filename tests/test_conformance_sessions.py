"""Persistent sessions on MQTT 3.1.1 and 5.0: unacknowledged QoS 1/2 PUBLISHes and PUBRELs resent on reconnect, in
order, with DUP and their packet ids [MQTT-4.4.0-1]; QoS 1/2 messages queued while the session is offline (bounded by
`max_queued`, drops counted), QoS 0 not queued (issue 10)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from spotbox.loadgen import mqtt_string
from spotbox.loadgen import publish_packet as loadgen_publish
from spotbox.settings import Settings
from tests.conformance import DROPPED, VERSIONS, Delivery, Peer, metric, peer, settings_with, start
from tests.conftest import Box, BoxFactory
from tests.helpers import payload
from tests.raw_mqtt import PUBACK, raw_session


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite."""
    return await start(make_box, tmp_path)


async def persistent_subscriber(box: Box, version: str, client_id: str, topic_filter: str = "s/#") -> None:
    """Make a persistent session subscribed to `topic_filter` at QoS 2, and leave it with a DISCONNECT."""
    async with peer(box.mqtt_port, version, client_id, clean=False) as (sub, _):
        assert await sub.subscribe((topic_filter, 2)) == [2]
        await sub.disconnect()


async def publish_all(box: Box, *messages: tuple[str, int], marker: bool = True) -> None:
    """Publish each (topic, QoS), its payload the topic's bytes, then a QoS 1 marker on s/marker."""
    async with peer(box.mqtt_port, "3.1.1") as (publisher, _):
        for topic, qos in messages:
            await publisher.publish(topic, topic.encode(), qos)
        if marker:
            await publisher.publish("s/marker", b"marker", 1)


async def unacknowledged(sub: Peer, count: int) -> list[tuple[str, int, bool, int | None]]:
    """(topic, QoS, DUP, packet id) of the next `count` deliveries, none acknowledged."""
    return [(d.topic, d.qos, d.dup, d.packet_id) for d in [await sub.next() for _ in range(count)]]


@pytest.mark.parametrize("version", VERSIONS)
async def test_unacknowledged_publishes_are_resent_in_order_with_dup(sbox: Box, version: str) -> None:
    """Test that QoS 1 and 2 PUBLISHes left unacknowledged come again after a reconnect: same order, same packet
    ids, DUP set; once acknowledged they do not come a third time."""
    await persistent_subscriber(sbox, version, "resend")
    async with peer(sbox.mqtt_port, version, "resend", clean=False) as (sub, present):
        assert present
        await publish_all(sbox, ("s/1", 1), ("s/2", 2), ("s/3", 1))
        first = await unacknowledged(sub, 4)
    assert [(topic, dup) for topic, _, dup, _ in first] == [
        ("s/1", False),
        ("s/2", False),
        ("s/3", False),
        ("s/marker", False),
    ]
    async with peer(sbox.mqtt_port, version, "resend", clean=False) as (sub, present):
        assert present
        await publish_all(sbox, ("s/new", 0), marker=False)  # resends come before what is published after
        again = [d for d in await sub.packets_until(b"s/new") if isinstance(d, Delivery)]
        assert [(d.topic, d.qos, d.dup, d.packet_id) for d in again] == [(t, q, True, i) for t, q, _, i in first]
        for delivery in again:
            await sub.ack(delivery)
        await sub.sync()
    async with peer(sbox.mqtt_port, version, "resend", clean=False) as (sub, present):
        assert present
        await publish_all(sbox, ("s/new", 0), marker=False)
        assert await sub.packets_until(b"s/new") == []


@pytest.mark.parametrize("version", VERSIONS)
async def test_unacknowledged_pubrel_is_resent(sbox: Box, version: str) -> None:
    """Test that a PUBREL the subscriber never completed is sent again after a reconnect, not the PUBLISH."""
    await persistent_subscriber(sbox, version, "pubrel")
    async with peer(sbox.mqtt_port, version, "pubrel", clean=False) as (sub, _):
        await publish_all(sbox, ("s/2", 2), marker=False)
        delivery = await sub.next()
        assert delivery.packet_id is not None
        await sub.send(bytes([0x50, 2]) + delivery.packet_id.to_bytes(2, "big"))  # PUBREC, and no PUBCOMP later
        release = await sub.next_ack()
    assert release == (0x62, delivery.packet_id)
    async with peer(sbox.mqtt_port, version, "pubrel", clean=False) as (sub, _):
        await publish_all(sbox)
        assert await sub.packets_until() == [(0x62, delivery.packet_id)]
        await sub.send(bytes([0x70, 2]) + delivery.packet_id.to_bytes(2, "big"))  # PUBCOMP
        assert await sub.silent_for(0.2)


@pytest.mark.parametrize("version", VERSIONS)
async def test_offline_session_gets_its_qos1_and_qos2_messages_not_qos0(sbox: Box, version: str) -> None:
    """Test that a persistent session offline receives, on its return, the QoS 1 and 2 messages in order and not
    the QoS 0 one."""
    await persistent_subscriber(sbox, version, "offline")
    await publish_all(sbox, ("s/a", 1), ("s/b", 0), ("s/c", 2), ("s/d", 1))
    async with peer(sbox.mqtt_port, version, "offline", clean=False) as (sub, present):
        assert present
        assert [(d.topic, d.qos) for d in await sub.received()] == [("s/a", 1), ("s/c", 2), ("s/d", 1)]


@pytest.mark.parametrize("version", VERSIONS)
async def test_offline_queue_is_bounded_and_drops_are_counted(
    make_box: BoxFactory, tmp_path: Path, version: str
) -> None:
    """Test that with max_queued 3 an offline session gets the first 3 of 5 QoS 1 messages (and the marker sent
    after a reconnect), and /metrics counts the 2 dropped."""
    box = await start(make_box, tmp_path, max_queued=3)
    await persistent_subscriber(box, version, "bounded")
    async with peer(box.mqtt_port, "3.1.1") as (publisher, _):
        for n in range(5):
            await publisher.publish(f"s/{n}", b"q", 1)
    async with peer(box.mqtt_port, version, "bounded", clean=False) as (sub, _):
        await publish_all(box)
        assert [d.topic for d in await sub.received()] == ["s/0", "s/1", "s/2"]
    assert sum((await metric(box, DROPPED)).values()) == 2


async def test_status_resent_after_a_restart_is_stored_once(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that a status without timestamp whose PUBACK was lost in a restart, resent with DUP and its packet id,
    is stored once; the same status sent again as a new message (no DUP, new id) is stored again."""
    body = payload(timestamp=...)
    first = await start(make_box, tmp_path)
    async with raw_session(first.mqtt_port, "idle-robot", clean=False) as (robot, _):
        await robot.send(loadgen_publish(mqtt_string("robot/IDLE/status"), 7, body, 1))
        await robot.expect(PUBACK)  # committed; the robot "loses" this PUBACK
    await first.server.close()
    second = await start(make_box, tmp_path)
    async with raw_session(second.mqtt_port, "idle-robot", clean=False) as (robot, _):
        await robot.send(loadgen_publish(mqtt_string("robot/IDLE/status"), 7, body, 1, dup=True))
        await robot.expect(PUBACK)
        assert len(await second.history("IDLE")) == 1
        await robot.send(loadgen_publish(mqtt_string("robot/IDLE/status"), 8, body, 1))
        await robot.expect(PUBACK)
    assert len(await second.history("IDLE")) == 2


def test_queue_and_receive_maximum_defaults(tmp_path: Path) -> None:
    """Test that an operator who sets nothing gets an offline queue of 1,000 messages per session and a Receive
    Maximum of 100."""
    settings_with(tmp_path, max_queued=1000, receive_maximum=100)  # an expected failure while Settings lacks them
    defaults = {field.name: field.default for field in dataclasses.fields(Settings)}
    assert (defaults["max_queued"], defaults["receive_maximum"]) == (1000, 100)
