"""MQTT 5.0 routing on spotbox's broker: properties, QoS 2 both ways, cross-version delivery, subscriptions and their
reason codes, retained messages, wills, topic aliases and keep-alive, as a bare codec client sees them on the wire."""

from __future__ import annotations

import asyncio
from typing import Any

import mqtt5
import pytest

from tests.conftest import Box
from tests.helpers import mqtt_client
from tests.mqtt5_clients import Wire, wire_client

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

Q0, Q1, Q2 = mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE, mqtt5.QoS.EXACTLY_ONCE
PROPERTIES: dict[str, Any] = {
    "payload_format_indicator": 1,
    "message_expiry_interval": 3600,
    "content_type": "text/plain",
    "response_topic": "robot/R1/reply",
    "correlation_data": b"req-1",
    "user_properties": [("origin", "test"), ("origin", "twice")],
}


async def subscribe(wire: Wire, *filters: str, qos: mqtt5.QoS = Q2, packet_id: int = 1) -> list[int]:
    """SUBSCRIBE and return the SUBACK reason codes."""
    await wire.send(mqtt5.SubscribePacket(packet_id, [mqtt5.TopicFilter(f, max_qos=qos) for f in filters]))
    suback = await wire.expect(mqtt5.SubAckPacket)
    assert suback.packet_id == packet_id
    return [int(code) for code in suback.reason_codes]


@pytest.fixture
def port(box: Box) -> int:
    """The MQTT port (routing does not depend on the database: SQLite only)."""
    return box.mqtt_port


async def test_publish_properties_reach_mqtt5_and_payload_reaches_311(port: int) -> None:
    """Test that a v5 PUBLISH's properties reach a v5 subscriber intact and its payload a 3.1.1 subscriber."""
    async with wire_client(port) as (subscriber, _), mqtt_client(port, "3.1.1") as old:
        # Subscribed at the publisher's QoS, so the message arrives at QoS 1 (the lower of the two).
        assert await subscribe(subscriber, "robot/+/cmd", qos=Q1) == [1]
        await old.subscribe("robot/+/cmd", qos=1)
        async with wire_client(port) as (publisher, _):
            await publisher.send(mqtt5.PublishPacket("robot/R1/cmd", b"stop", qos=Q1, packet_id=5, **PROPERTIES))
            puback = await publisher.expect(mqtt5.PubAckPacket)
            assert (puback.packet_id, puback.reason_code) == (5, mqtt5.PubAckReasonCode.SUCCESS)
        delivered = await subscriber.expect(mqtt5.PublishPacket)
        assert (delivered.topic, delivered.payload, delivered.qos) == ("robot/R1/cmd", b"stop", Q1)
        for name, value in PROPERTIES.items():
            if name == "message_expiry_interval":
                assert 0 < delivered.message_expiry_interval <= 3600  # type: ignore[operator]
            else:
                assert getattr(delivered, name) == value, name
        assert delivered.packet_id is not None
        await subscriber.send(mqtt5.PubAckPacket(delivered.packet_id))
        async with asyncio.timeout(10):
            message = await anext(aiter(old.messages))
        assert message.payload == b"stop"


async def test_311_publish_reaches_mqtt5_subscriber(port: int) -> None:
    """Test that a 3.1.1 publisher's message reaches an MQTT 5 subscriber as an MQTT 5 PUBLISH."""
    async with wire_client(port) as (subscriber, _):
        assert await subscribe(subscriber, "robot/R2/cmd", qos=Q0) == [0]
        async with mqtt_client(port, "3.1.1") as old:
            await old.publish("robot/R2/cmd", b"go", qos=1)
        delivered = await subscriber.expect(mqtt5.PublishPacket)
        assert (delivered.topic, delivered.payload, delivered.qos, delivered.user_properties) == (
            "robot/R2/cmd",
            b"go",
            Q0,
            [],
        )


async def test_qos2_both_ways(port: int) -> None:
    """Test the QoS 2 flows: PUBREC/PUBREL/PUBCOMP from the publisher in, and to the subscriber out."""
    async with wire_client(port) as (subscriber, _), wire_client(port) as (publisher, _):
        assert await subscribe(subscriber, "robot/R3/cmd") == [2]
        await publisher.send(mqtt5.PublishPacket("robot/R3/cmd", b"exactly once", qos=Q2, packet_id=7))
        assert (await publisher.expect(mqtt5.PubRecPacket)).reason_code == mqtt5.PubRecReasonCode.SUCCESS
        await publisher.send(mqtt5.PubRelPacket(7))
        assert (await publisher.expect(mqtt5.PubCompPacket)).packet_id == 7
        delivered = await subscriber.expect(mqtt5.PublishPacket)
        assert (delivered.payload, delivered.qos) == (b"exactly once", Q2)
        assert delivered.packet_id is not None
        await subscriber.send(mqtt5.PubRecPacket(delivered.packet_id))
        assert (await subscriber.expect(mqtt5.PubRelPacket)).packet_id == delivered.packet_id
        await subscriber.send(mqtt5.PubCompPacket(delivered.packet_id))


async def test_suback_and_unsuback_reason_codes(port: int) -> None:
    """Test SUBACK codes (granted QoS; 0x8F for a shared subscription without a group), UNSUBACK codes, PINGRESP."""
    async with wire_client(port) as (wire, _):
        codes = await subscribe(wire, "robot/+/status", "$share/group/robot/+/status", "$share//robot/#", qos=Q1)
        assert codes == [1, 1, 0x8F]
        await wire.send(mqtt5.UnsubscribePacket(2, ["robot/+/status", "never/subscribed"]))
        unsuback = await wire.expect(mqtt5.UnsubAckPacket)
        assert unsuback.packet_id == 2
        assert unsuback.reason_codes == [
            mqtt5.UnsubAckReasonCode.SUCCESS,
            mqtt5.UnsubAckReasonCode.NO_SUBSCRIPTION_EXISTED,
        ]
        await wire.send(mqtt5.PingReqPacket())
        await wire.expect(mqtt5.PingRespPacket)


async def test_retained_message_keeps_its_properties(port: int) -> None:
    """Test that a retained v5 message reaches a later v5 subscriber with the retain flag and its properties."""
    async with wire_client(port) as (publisher, _):
        await publisher.send(
            mqtt5.PublishPacket("robot/R4/cmd", b"park", qos=Q1, packet_id=1, retain=True, **PROPERTIES)
        )
        await publisher.expect(mqtt5.PubAckPacket)
    async with wire_client(port) as (late, _):
        assert await subscribe(late, "robot/R4/cmd", qos=Q1) == [1]
        delivered = await late.expect(mqtt5.PublishPacket)
        assert (delivered.payload, delivered.retain, delivered.content_type) == (b"park", True, "text/plain")
        assert delivered.user_properties == PROPERTIES["user_properties"]
    async with mqtt_client(port, "3.1.1") as old:
        await old.subscribe("robot/R4/cmd", qos=1)
        async with asyncio.timeout(10):
            message = await anext(aiter(old.messages))
        assert (message.payload, message.retain) == (b"park", True)


@pytest.mark.parametrize(
    ("ending", "will_sent"),
    [
        (mqtt5.DisconnectPacket(), False),
        (mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.DISCONNECT_WITH_WILL_MESSAGE), True),
        (None, True),  # the connection drops without DISCONNECT
        (mqtt5.AuthPacket().write(), True),  # AUTH without an authentication method: spotbox disconnects it
    ],
)
async def test_will_follows_the_way_the_connection_ends(
    port: int, ending: mqtt5.DisconnectPacket | bytes | None, will_sent: bool
) -> None:
    """Test that the will (with its properties) is published unless the client ends with a normal DISCONNECT."""
    will = mqtt5.Will("robot/R5/lwt", payload=b"gone", qos=Q1, user_properties=[("why", "will")])
    async with wire_client(port) as (watcher, _):
        assert await subscribe(watcher, "robot/R5/lwt", "robot/R5/marker", qos=Q1) == [1, 1]
        async with wire_client(port, will=will) as (robot, _):
            if isinstance(ending, bytes):
                await robot.send(ending)
                disconnect = await robot.expect(mqtt5.DisconnectPacket)
                assert disconnect.reason_code == mqtt5.DisconnectReasonCode.PROTOCOL_ERROR
            elif ending is not None:
                await robot.send(ending)
        # A marker published after the robot has gone: the will, if any, is delivered before it.
        async with wire_client(port) as (marker, _):
            await marker.send(mqtt5.PublishPacket("robot/R5/marker", b"after", qos=Q1, packet_id=1))
            await marker.expect(mqtt5.PubAckPacket)
        first = await watcher.expect(mqtt5.PublishPacket)
        if will_sent:
            assert (first.topic, first.payload, first.user_properties) == ("robot/R5/lwt", b"gone", [("why", "will")])
        else:
            assert first.topic == "robot/R5/marker"


async def test_topic_alias_is_resolved_and_bad_alias_disconnects(port: int) -> None:
    """Test that a topic alias set on one PUBLISH names the topic of the next, and one over the maximum is 0x94."""
    async with wire_client(port) as (subscriber, _), wire_client(port) as (publisher, connack):
        assert await subscribe(subscriber, "robot/R6/cmd", qos=Q0) == [0]
        await publisher.send(
            mqtt5.PublishPacket("robot/R6/cmd", b"one", topic_alias=1),
            mqtt5.PublishPacket("", b"two", topic_alias=1),
        )
        assert [(await subscriber.expect(mqtt5.PublishPacket)).payload for _ in range(2)] == [b"one", b"two"]
        await publisher.send(mqtt5.PublishPacket("robot/R6/cmd", b"three", topic_alias=connack.topic_alias_max + 1))
        disconnect = await publisher.expect(mqtt5.DisconnectPacket)
        assert disconnect.reason_code == mqtt5.DisconnectReasonCode.TOPIC_ALIAS_INVALID
        assert await publisher.closed()


async def test_invalid_filter_gets_0x8f(port: int) -> None:
    """Test that a SUBSCRIBE to a filter with "#" mid-way gets SUBACK 0x8F Topic Filter invalid."""
    async with wire_client(port) as (wire, _):
        await wire.send(b"\x82\x0a\x00\x01\x00\x00\x04a/#/\x01")  # the codec will not write this filter
        suback = await wire.expect(mqtt5.SubAckPacket)
        assert suback.reason_codes == [mqtt5.SubAckReasonCode.TOPIC_FILTER_INVALID]


async def test_malformed_packet_gets_disconnect_0x81(port: int) -> None:
    """Test that a packet the codec cannot decode ends the connection with DISCONNECT 0x81 Malformed Packet."""
    async with wire_client(port) as (wire, _):
        await wire.send(b"\x82\x02\x00\x01")  # SUBSCRIBE without its properties length or any filter
        disconnect = await wire.expect(mqtt5.DisconnectPacket)
        assert disconnect.reason_code == mqtt5.DisconnectReasonCode.MALFORMED_PACKET
        assert await wire.closed()


async def test_persistent_session_gets_queued_message(port: int) -> None:
    """Test that a session with an expiry interval is resumed (session present) with the QoS 1 message it missed."""
    kept = {"client_id": "persistent-v5", "clean_start": False, "session_expiry_interval": 300}
    async with wire_client(port, **{**kept, "clean_start": True}) as (wire, connack):
        assert not connack.session_present
        assert await subscribe(wire, "robot/R7/cmd", qos=Q1) == [1]
        await wire.send(mqtt5.DisconnectPacket())
    async with wire_client(port) as (publisher, _):
        await publisher.send(mqtt5.PublishPacket("robot/R7/cmd", b"while away", qos=Q1, packet_id=1))
        await publisher.expect(mqtt5.PubAckPacket)
    async with wire_client(port, **kept) as (wire, connack):
        assert connack.session_present
        assert (await wire.expect(mqtt5.PublishPacket)).payload == b"while away"


async def test_message_over_the_clients_maximum_packet_size_is_not_sent(port: int) -> None:
    """Test that a message too big for a subscriber's Maximum Packet Size is skipped, and the next one delivered."""
    async with wire_client(port, max_packet_size=64) as (subscriber, _), wire_client(port) as (publisher, _):
        assert await subscribe(subscriber, "robot/R8/cmd", qos=Q0) == [0]
        await publisher.send(
            mqtt5.PublishPacket("robot/R8/cmd", b"x" * 100), mqtt5.PublishPacket("robot/R8/cmd", b"small")
        )
        assert (await subscriber.expect(mqtt5.PublishPacket)).payload == b"small"
