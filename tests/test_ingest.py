"""End to end through the real broker on port 0: MQTT in, storage, live feed and history out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import aiomqtt
import orjson
import pytest

from tests.cases import INVALID
from tests.conftest import Box, require_tool
from tests.helpers import mqtt_client, open_feed, payload, stamp
from tests.mqtt5_clients import paho_v5


async def test_valid_status_reaches_feed_and_history(box: Box) -> None:
    """Test that a status published over MQTT 3.1.1 arrives on the live feed and in the history, same row."""
    async with open_feed(box.http, f"{box.base_url}/robots/ROBOT-001/feed") as feed:
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/ROBOT-001/status", payload(firmware="2.0"), qos=1)
        async with asyncio.timeout(10):
            event = await feed.next()
    assert event.event == "status"
    live = event.json()
    assert event.id == str(live["id"])
    assert live["serial_number"] == "ROBOT-001"
    assert live["battery_level"] == 80
    assert live["location"] == {"latitude": 52.52, "longitude": 13.405, "height": 34.0}
    assert live["ts"] == "2026-11-22T10:00:00Z"
    assert "payload" not in live
    history = await box.history("ROBOT-001", include_payload="true")
    assert len(history) == 1
    assert history[0]["id"] == live["id"]
    assert history[0]["payload"]["firmware"] == "2.0"
    assert {key: value for key, value in history[0].items() if key != "payload"} == live


async def test_qos1_acknowledgement_means_stored(box: Box) -> None:
    """Test that once PUBACK reaches the publisher, the status is already in the history (durable ack)."""
    async with mqtt_client(box.mqtt_port) as robot:
        for n in range(20):
            await robot.publish("robot/ROBOT-007/status", payload(timestamp=stamp(n)), qos=1)
            assert len(await box.history("ROBOT-007")) == n + 1


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_every_qos_is_stored(box: Box, qos: int) -> None:
    """Test that QoS 0, 1 and 2 statuses are all stored and streamed."""
    async with open_feed(box.http, f"{box.base_url}/robots/ROBOT-002/feed") as feed:
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/ROBOT-002/status", payload(), qos=qos)
        async with asyncio.timeout(10):
            assert (await feed.next()).json()["serial_number"] == "ROBOT-002"
    assert len(await box.history("ROBOT-002")) == 1


async def test_mosquitto_pub_status_is_stored(box: Box) -> None:
    """Test that mosquitto_pub (MQTT 3.1.1, QoS 1), a real third-party client, publishes a stored status."""
    mosquitto_pub = require_tool("mosquitto_pub")
    proc = await asyncio.create_subprocess_exec(
        mosquitto_pub,
        "-p",
        str(box.mqtt_port),
        "-V",
        "mqttv311",
        "-q",
        "1",
        "-t",
        "robot/ROBOT-003/status",
        "-m",
        payload().decode(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(10):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err
    # mosquitto_pub exits after PUBACK, and PUBACK means committed.
    items = await box.history("ROBOT-003")
    assert len(items) == 1
    assert items[0]["battery_level"] == 80


async def test_invalid_statuses_are_never_stored_streamed_or_routed(box: Box) -> None:
    """Test that no invalid case of tests/cases.py is stored, streamed or delivered; the valid one after is."""
    async with (
        open_feed(box.http, f"{box.base_url}/robots/ROBOT-004/feed") as feed,
        mqtt_client(box.mqtt_port) as watcher,
    ):
        await watcher.subscribe("robot/+/status", qos=1)
        await watcher.subscribe("spotbox/rejected/+", qos=1)
        async with mqtt_client(box.mqtt_port) as robot:
            for _, doc, _ in INVALID:
                await robot.publish("robot/ROBOT-004/status", orjson.dumps(doc), qos=1)
            for raw in (b"{not json", b"\xff", b"[1]"):
                await robot.publish("robot/ROBOT-004/status", raw, qos=1)
            await robot.publish("robot/ROBOT-004/status", payload(battery_level=33), qos=1)
        async with asyncio.timeout(10):
            event = await feed.next()
            assert event.json()["battery_level"] == 33
            delivered: list[aiomqtt.Message] = []
            rejected: list[dict[str, object]] = []
            async for message in watcher.messages:
                if str(message.topic).startswith("spotbox/rejected/"):
                    assert isinstance(message.payload, bytes)
                    rejected.append(orjson.loads(message.payload))
                else:
                    delivered.append(message)
                if delivered and len(rejected) == len(INVALID) + 3:
                    break
    assert len(delivered) == 1
    assert isinstance(delivered[0].payload, bytes)
    assert orjson.loads(delivered[0].payload)["battery_level"] == 33
    expected_fields = [field for _, _, field in INVALID] + ["payload", "payload", "payload"]
    assert [str(report["errors"][0]).split(":")[0] for report in rejected] == expected_fields  # type: ignore[index]
    assert all(report["topic"] == "robot/ROBOT-004/status" for report in rejected)
    history = await box.history("ROBOT-004")
    assert [item["battery_level"] for item in history] == [33]
    assert box.pipeline.stats.rejected.total() == len(INVALID) + 3


async def test_status_without_timestamp_is_stored_with_receive_time(box: Box) -> None:
    """Test that a status with no `timestamp` gets ts = the time spotbox received it."""
    before = datetime.now(UTC)
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/ROBOT-005/status", payload(timestamp=...), qos=1)
    after = datetime.now(UTC)
    [item] = await box.history("ROBOT-005")
    ts = datetime.fromisoformat(item["ts"])
    assert item["ts"] == item["received_at"]
    assert before - timedelta(milliseconds=1) <= ts <= after


async def test_redelivered_status_is_stored_and_streamed_once(box: Box) -> None:
    """Test that publishing the same status twice (a robot's retry) yields one row and one feed event."""
    async with open_feed(box.http, f"{box.base_url}/robots/ROBOT-006/feed") as feed:
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/ROBOT-006/status", payload(), qos=1)
            await robot.publish("robot/ROBOT-006/status", payload(), qos=1)
            await robot.publish("robot/ROBOT-006/status", payload(battery_level=7), qos=1)
        async with asyncio.timeout(10):
            first, second = await feed.next(), await feed.next()
    assert [first.json()["battery_level"], second.json()["battery_level"]] == [80, 7]
    assert len(await box.history("ROBOT-006")) == 2


@pytest.mark.sqlite_only
async def test_other_topics_route_like_any_broker(box: Box) -> None:
    """Test that a command to a robot on robot/{serial}/cmd is delivered untouched and not stored."""
    async with mqtt_client(box.mqtt_port) as robot, mqtt_client(box.mqtt_port) as operator:
        await robot.subscribe("robot/ROBOT-008/cmd", qos=1)
        await operator.publish("robot/ROBOT-008/cmd", b"dock now", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(robot.messages))
    assert message.payload == b"dock now"
    assert await box.history("ROBOT-008") == []


async def test_retained_status_is_the_last_valid_one(box: Box) -> None:
    """Test that a retained valid status is kept for late subscribers, and a rejected one never replaces it."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/ROBOT-009/status", payload(battery_level=55), qos=1, retain=True)
        await robot.publish("robot/ROBOT-009/status", payload(battery_level=555), qos=1, retain=True)
    async with mqtt_client(box.mqtt_port) as late:
        await late.subscribe("robot/ROBOT-009/status", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(late.messages))
    assert isinstance(message.payload, bytes)
    assert orjson.loads(message.payload)["battery_level"] == 55


async def test_an_empty_retained_message_clears_the_retained_status(box: Box) -> None:
    """Test that a zero-byte retained PUBLISH on a status topic deletes the retained status [MQTT-3.3.1-10 (3.1.1),
    MQTT-3.3.1-6 (5.0)]: acknowledged as a success, not refused as an invalid status, and nothing stored."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/ROBOT-011/status", payload(battery_level=55), qos=1, retain=True)
        await robot.publish("robot/ROBOT-011/status", b"", qos=1, retain=True)
    async with mqtt_client(box.mqtt_port) as late, mqtt_client(box.mqtt_port) as robot:
        await late.subscribe("robot/ROBOT-011/status", qos=1)
        # The first message the late subscriber gets is this live one: no retained status came before it.
        await robot.publish("robot/ROBOT-011/status", payload(battery_level=66), qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(late.messages))
    assert isinstance(message.payload, bytes)
    assert orjson.loads(message.payload)["battery_level"] == 66
    assert len(await box.history("ROBOT-011")) == 2
    assert box.pipeline.stats.rejected.total() == 0


async def test_an_empty_status_that_is_not_retained_is_still_refused(box: Box) -> None:
    """Test that a zero-byte status without RETAIN is an invalid status (0x99 over MQTT 5), as before."""
    async with paho_v5(box.mqtt_port) as robot:
        code, _ = await robot.publish("robot/ROBOT-012/status", b"", qos=1)
    assert code.value == 0x99
    assert box.pipeline.stats.rejected.total() == 1


async def test_mqtt_over_websocket_on_the_http_port(box: Box) -> None:
    """Test that an MQTT client over WebSocket at /mqtt on the HTTP port publishes a stored status."""
    assert box.server.port is not None
    async with mqtt_client(box.server.port, transport="websockets", path="/mqtt") as robot:
        await robot.publish("robot/ROBOT-010/status", payload(), qos=1)
    assert len(await box.history("ROBOT-010")) == 1
