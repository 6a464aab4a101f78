"""spotbox's own MQTT engine beyond the protocol's rules: its log lines, its limits and its hooks (its settings' checks
are in test_settings)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import mqtt5
import orjson
import pytest

from spotbox.mqtt.broker import Broker
from spotbox.mqtt.wire import REASON_MAX_CHARS
from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, payload, stamp
from tests.mqtt5_clients import wire_client
from tests.raw_mqtt import CONNACK_ACCEPTED, connect_packet, publish, raw_client, subscribe


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """A test spotbox on SQLite (these tests are about the broker, not storage)."""
    return Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'x.db'}", batch_wait_ms=1.0)


async def test_reason_string_is_shortened_so_the_puback_goes_out(box: Box) -> None:
    """Test that a refusal whose reason would run past 65,535 bytes still gets PUBACK 0x99, with a short reason."""
    huge = "FULL" * 20_000  # echoed by the schema's enum message
    async with wire_client(box.mqtt_port) as (wire, _):
        await wire.send(
            mqtt5.PublishPacket(
                "robot/R-LONG/status", payload(battery_status=huge), qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=4
            )
        )
        puback = await wire.expect(mqtt5.PubAckPacket)
    assert (puback.packet_id, puback.reason_code) == (4, mqtt5.PubAckReasonCode.PAYLOAD_FORMAT_INVALID)
    assert puback.reason_str is not None
    assert puback.reason_str.startswith("battery_status:")
    assert len(puback.reason_str) <= REASON_MAX_CHARS


async def test_qos0_past_the_outbound_budget_is_dropped_and_counted(
    make_box: BoxFactory, sqlite_settings: Settings
) -> None:
    """Test that a subscriber that stops reading gets no more QoS 0 messages than its budget holds, the rest counted
    as dropped, while the publisher goes on unhindered."""
    box = await make_box(dataclasses.replace(sqlite_settings, max_outbound_bytes=64 * 1024))
    broker = box.broker
    assert isinstance(broker, Broker)
    async with raw_client(box.mqtt_port) as stuck, mqtt_client(box.mqtt_port) as sender:
        await stuck.send(connect_packet("stuck"))
        assert await stuck.connack() == CONNACK_ACCEPTED
        await stuck.send(subscribe(1, ("big/#", 0)))
        await stuck.expect(0x90)
        # The stuck client never reads again: 40 MB of QoS 0 messages would be buffered without a budget.
        for _ in range(400):
            await sender.publish("big/data", b"x" * 100_000, qos=0)
        await sender.publish("big/data", b"last", qos=1)  # acknowledged: everything before it was routed
        assert broker.counters.dropped_max_outbound_bytes > 300
    async with box.http.get(f"{box.base_url}/metrics") as resp:
        assert 'spotbox_mqtt_messages_dropped_total{reason="max_outbound_bytes"}' in await resp.text()


async def test_presence_hook_hears_of_each_closed_connection(box: Box) -> None:
    """Test that on_connection_closed is called once a logged-in client leaves, with the serials it stored."""
    broker = box.broker
    assert isinstance(broker, Broker)
    closed: asyncio.Queue[tuple[str, frozenset[str]]] = asyncio.Queue()
    broker.on_connection_closed = lambda client_id, serials: closed.put_nowait((client_id, serials))
    async with mqtt_client(box.mqtt_port, identifier="presence-1") as robot:
        await robot.publish("robot/R-P1/status", payload(timestamp=stamp(1)), qos=1)
        await robot.publish("robot/R-P2/status", payload(timestamp=stamp(2)), qos=1)
        await robot.publish("robot/R-P3/status", b"not json", qos=1)  # refused: not stored, not named
    async with asyncio.timeout(10):
        assert await closed.get() == ("presence-1", frozenset({"R-P1", "R-P2"}))


async def test_connections_logging_in_are_bounded(make_box: BoxFactory, sqlite_settings: Settings) -> None:
    """Test that past max_pending_logins sockets that have not logged in, a new socket is closed at once, and a
    logged-in client still publishes."""
    box = await make_box(dataclasses.replace(sqlite_settings, max_pending_logins=3))
    idle = [await asyncio.open_connection("127.0.0.1", box.mqtt_port) for _ in range(3)]
    try:
        async with raw_client(box.mqtt_port) as extra, asyncio.timeout(5):
            await extra.wait_closed_by_server()
    finally:
        for _, writer in idle:
            writer.close()
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/R-OK/status", payload(timestamp=stamp(3)), qos=1)
    assert [item["ts"] for item in await box.history("R-OK")] == [stamp(3)]


async def test_status_with_properties_is_routed_with_them(box: Box) -> None:
    """Test that an MQTT 5 status with a content type and user properties is stored and reaches a v5 subscriber
    with its properties, user properties in order."""
    user_properties = [("b", "2"), ("a", "1")]
    async with wire_client(box.mqtt_port) as (watcher, _), wire_client(box.mqtt_port) as (robot, _):
        await watcher.send(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter("robot/+/status", max_qos=mqtt5.QoS(1))]))
        await watcher.expect(mqtt5.SubAckPacket)
        status = payload(timestamp=stamp(4))
        await robot.send(
            mqtt5.PublishPacket(
                "robot/R-PROP/status",
                status,
                qos=mqtt5.QoS.AT_LEAST_ONCE,
                packet_id=1,
                content_type="application/json",
                user_properties=user_properties,
            )
        )
        assert (await robot.expect(mqtt5.PubAckPacket)).reason_code == mqtt5.PubAckReasonCode.SUCCESS
        delivered = await watcher.expect(mqtt5.PublishPacket)
    assert orjson.loads(delivered.payload) == orjson.loads(status)
    assert (delivered.content_type, delivered.user_properties) == ("application/json", user_properties)
    assert len(await box.history("R-PROP")) == 1


async def test_publish_hidden_in_a_payload_is_never_read(box: Box) -> None:
    """Test that a PUBLISH with a wildcard topic ends the connection: the PUBLISH inside its payload never arrives."""
    hidden = publish("robot/R-HID/cmd", b"smuggled", qos=0)
    async with mqtt_client(box.mqtt_port) as watcher:
        await watcher.subscribe("robot/R-HID/#", qos=0)
        async with raw_client(box.mqtt_port) as attacker:
            await attacker.send(connect_packet("attacker"))
            assert await attacker.connack() == CONNACK_ACCEPTED
            await attacker.send(publish("robot/+/cmd", hidden, qos=0))
            async with asyncio.timeout(5):
                await attacker.wait_closed_by_server()
        await watcher.publish("robot/R-HID/cmd", b"marker", qos=1)
        async with asyncio.timeout(5):
            assert (await anext(watcher.messages)).payload == b"marker"
