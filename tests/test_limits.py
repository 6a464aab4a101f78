"""Input limits: payload and topic size refused from the packet header, connection count, JSON depth."""

from __future__ import annotations

import asyncio
import struct
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from spotbox.loadgen import connect_packet, remaining_length
from spotbox.settings import BUNDLED_SCHEMA, Settings
from spotbox.validation import Rejection, StatusValidator
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, payload, stamp
from tests.raw_mqtt import CONNACK_ACCEPTED, publish_packet, raw_client, ws_raw_client

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

NOW = datetime(2026, 11, 22, tzinfo=UTC)
MAX_PAYLOAD = 1000
MAX_TOPIC = 40


@pytest.fixture
async def limited(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox with small limits, so that tests cross them with small packets."""
    settings = Settings(
        http_port=0,
        mqtt_port=0,
        database_url=f"sqlite:///{tmp_path / 'spotbox.db'}",
        batch_wait_ms=1.0,
        max_payload=MAX_PAYLOAD,
        max_topic_length=MAX_TOPIC,
        max_connections=3,
    )
    return await make_box(settings)


async def still_stores(box: Box, n: int) -> None:
    """A second, well-behaved robot publishes a status that is stored."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/ROBOT-OK/status", payload(timestamp=stamp(n)), qos=1)
    assert stamp(n) in [item["ts"] for item in await box.history("ROBOT-OK")]


async def test_oversized_payload_is_refused_from_its_header(limited: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that a PUBLISH announcing a payload over --max-payload closes the connection before the payload is sent."""
    topic = b"robot/ROBOT-BIG/status"
    body_length = 2 + len(topic) + 2 + MAX_PAYLOAD + 1
    async with raw_client(limited.mqtt_port) as client:
        await client.send(connect_packet("big"))
        async with asyncio.timeout(10):
            assert await client.connack() == CONNACK_ACCEPTED
            # Only the fixed header, topic and packet id: the server must refuse without waiting for the payload.
            await client.send(b"\x32" + remaining_length(body_length) + struct.pack("!H", len(topic)) + topic + b"\0\1")
            await client.wait_closed_by_server()
    assert f"a PUBLISH payload of {MAX_PAYLOAD + 1} bytes is over --max-payload {MAX_PAYLOAD}" in caplog.text
    await still_stores(limited, 1)


async def test_payload_at_the_limit_is_accepted(limited: Box) -> None:
    """Test that a payload of exactly --max-payload bytes is routed (the limit is inclusive)."""
    async with mqtt_client(limited.mqtt_port) as watcher, mqtt_client(limited.mqtt_port) as robot:
        await watcher.subscribe("robot/ROBOT-1/cmd", qos=1)
        await robot.publish("robot/ROBOT-1/cmd", b"x" * MAX_PAYLOAD, qos=1)
        async with asyncio.timeout(10):
            message = await anext(watcher.messages)
    assert message.payload == b"x" * MAX_PAYLOAD


async def test_oversized_payload_over_websocket_is_refused(limited: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that the payload limit holds for MQTT over WebSocket too: the connection is closed at once, without a
    PUBACK, and the status is not stored."""
    # Small enough for one WebSocket message, one byte over the payload limit.
    big = publish_packet(b"robot/ROBOT-WS/status", b"x" * (MAX_PAYLOAD + 1), qos=1, packet_id=7)
    async with ws_raw_client(limited.http, limited.base_url) as client:
        await client.send(connect_packet("ws-big"))
        async with asyncio.timeout(10):
            assert await client.read_packet() == (0x20, bytes([0, CONNACK_ACCEPTED]))
            await client.send(big)
            assert await client.read_packet() is None  # closed by the server, nothing answered
    assert "over --max-payload" in caplog.text
    assert await limited.history("ROBOT-WS") == []
    await still_stores(limited, 2)


@pytest.mark.parametrize(("length", "refused"), [(MAX_TOPIC, False), (MAX_TOPIC + 1, True)])
async def test_topic_length_limit(limited: Box, length: int, refused: bool) -> None:
    """Test that a topic over --max-topic-length closes the connection, and one at the limit is acknowledged."""
    async with raw_client(limited.mqtt_port) as client:
        await client.send(connect_packet("topic"))
        async with asyncio.timeout(10):
            assert await client.connack() == CONNACK_ACCEPTED
            await client.send(publish_packet(b"t" * length, b"hello", qos=1, packet_id=7))
            if refused:
                await client.wait_closed_by_server()
            else:
                assert await client.read_packet() == (0x40, b"\0\7")  # PUBACK of packet 7
    await still_stores(limited, 3)


async def test_connections_over_the_limit_are_refused(limited: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that a client beyond --max-connections is closed unanswered, and a freed place can be taken again."""
    async with (
        mqtt_client(limited.mqtt_port),
        mqtt_client(limited.mqtt_port),
        raw_client(limited.mqtt_port) as third,
    ):
        await third.send(connect_packet("third"))
        async with asyncio.timeout(10):
            assert await third.connack() == CONNACK_ACCEPTED
        async with raw_client(limited.mqtt_port) as fourth:
            await fourth.send(connect_packet("fourth"))
            async with asyncio.timeout(10):
                await fourth.wait_closed_by_server()
    assert "--max-connections 3 reached" in caplog.text
    await still_stores(limited, 4)


def test_json_depth_limit() -> None:
    """Test that a status nesting deeper than the limit is rejected with a reason naming the limit."""
    validator = StatusValidator(BUNDLED_SCHEMA, max_depth=3)
    # The status is level 1, `extra` level 2, `a` level 3: at the limit. One more level is over it.
    assert not isinstance(validator.check("R", payload(extra={"a": {"b": 1}}), NOW), Rejection)
    verdict = validator.check("R", payload(extra={"a": {"b": [1]}}), NOW)
    assert isinstance(verdict, Rejection)
    assert verdict.errors == ["payload: nests objects and arrays deeper than 3 levels (--max-json-depth)"]


async def test_deep_json_over_mqtt_is_reported(limited: Box) -> None:
    """Test that a deeply nested status published over MQTT is rejected, reported, and not stored."""
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    async with mqtt_client(limited.mqtt_port) as operator:
        await operator.subscribe("spotbox/rejected/ROBOT-DEEP", qos=1)
        async with mqtt_client(limited.mqtt_port) as robot:
            await robot.publish("robot/ROBOT-DEEP/status", payload(extra=deep), qos=1)
        async with asyncio.timeout(10):
            message = await anext(operator.messages)
    assert isinstance(message.payload, bytes)
    report = orjson.loads(message.payload)
    assert report["errors"] == ["payload: nests objects and arrays deeper than 32 levels (--max-json-depth)"]
    assert await limited.history("ROBOT-DEEP") == []
