"""MQTT 5.0 subscription options, subscription identifiers and shared subscriptions on spotbox's broker, as a bare
codec client sees them on the wire (MQTT 5.0 sections 3.8.3.1, 3.3.4, 4.8.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mqtt5
import pytest

from tests.conftest import Box, BoxFactory
from tests.mqtt5_clients import Wire, wire_client
from tests.test_auth import PASSWORDS, secured_settings

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

Q0, Q1 = mqtt5.QoS.AT_MOST_ONCE, mqtt5.QoS.AT_LEAST_ONCE
ALWAYS, IF_NEW, NEVER = (
    mqtt5.RetainHandling.SEND_ALWAYS,
    mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
    mqtt5.RetainHandling.SEND_NEVER,
)


def plain(pattern: str, **options: Any) -> mqtt5.TopicFilter:
    """A QoS 0 filter with every option off (the codec's default keeps Retain As Published on) unless given."""
    return mqtt5.TopicFilter(pattern, **{"max_qos": Q0, "retain_as_published": False, **options})


async def subscribe(wire: Wire, *filters: mqtt5.TopicFilter, packet_id: int = 1, sub_id: int | None = None) -> None:
    """SUBSCRIBE and check that every filter was granted."""
    await wire.send(mqtt5.SubscribePacket(packet_id, list(filters), subscription_id=sub_id))
    suback = await wire.expect(mqtt5.SubAckPacket)
    assert suback.packet_id == packet_id
    assert [int(code) for code in suback.reason_codes] == [int(f.max_qos) for f in filters]


async def publish(wire: Wire, topic: str, payload: bytes, retain: bool = False, packet_id: int = 1) -> None:
    """PUBLISH at QoS 1 and wait for its PUBACK, so it has been routed before the next one."""
    await wire.send(mqtt5.PublishPacket(topic, payload, qos=Q1, packet_id=packet_id, retain=retain))
    assert (await wire.expect(mqtt5.PubAckPacket)).reason_code == mqtt5.PubAckReasonCode.SUCCESS


async def until_marker(wire: Wire, marker: bytes = b"marker") -> list[mqtt5.PublishPacket]:
    """The PUBLISHes received before the one carrying `marker`."""
    received = []
    while (packet := await wire.expect(mqtt5.PublishPacket)).payload != marker:
        received.append(packet)
    return received


@pytest.fixture
def port(box: Box) -> int:
    """The MQTT port (routing does not depend on the database: SQLite only)."""
    return box.mqtt_port


async def test_no_local_keeps_a_clients_own_messages_from_it(port: int) -> None:
    """Test that No Local keeps a client's own publish from it, not other clients' or other subscribers'."""
    async with wire_client(port) as (robot, _), wire_client(port) as (watcher, _), wire_client(port) as (peer, _):
        await subscribe(robot, plain("robot/N1/cmd", no_local=True))
        await subscribe(watcher, plain("robot/N1/cmd"))
        await publish(robot, "robot/N1/cmd", b"mine")  # its PUBACK would come after a PUBLISH sent back to it
        await publish(peer, "robot/N1/cmd", b"theirs")
        await publish(peer, "robot/N1/cmd", b"marker", packet_id=2)
        assert [p.payload for p in await until_marker(robot)] == [b"theirs"]
        assert [p.payload for p in await until_marker(watcher)] == [b"mine", b"theirs"]


async def test_retain_as_published_keeps_the_retain_flag(port: int) -> None:
    """Test that a forwarded retained publish keeps RETAIN only on a Retain As Published subscription."""
    async with wire_client(port) as (kept, _), wire_client(port) as (cleared, _), wire_client(port) as (robot, _):
        await subscribe(kept, plain("robot/R1/cmd", retain_as_published=True))
        await subscribe(cleared, plain("robot/R1/cmd"))
        await publish(robot, "robot/R1/cmd", b"retained", retain=True)
        await publish(robot, "robot/R1/cmd", b"not retained", packet_id=2)
        assert [(p.payload, p.retain) for p in [await kept.expect(mqtt5.PublishPacket) for _ in range(2)]] == [
            (b"retained", True),
            (b"not retained", False),
        ]
        assert [(p.payload, p.retain) for p in [await cleared.expect(mqtt5.PublishPacket) for _ in range(2)]] == [
            (b"retained", False),
            (b"not retained", False),
        ]


@pytest.mark.parametrize("delay", [0, 1])
async def test_retain_as_published_applies_to_a_retained_will(port: int, delay: int) -> None:
    """Test that a retained will, at once or after its delay, keeps RETAIN on a Retain As Published subscription."""
    will = mqtt5.Will("robot/R3/lwt", payload=b"gone", retain=True, will_delay_interval=delay)
    async with wire_client(port) as (kept, _), wire_client(port) as (cleared, _):
        await subscribe(kept, plain("robot/R3/lwt", retain_as_published=True))
        await subscribe(cleared, plain("robot/R3/lwt"))
        async with wire_client(port, will=will, clean_start=False, session_expiry_interval=60):
            pass  # the connection is lost
        assert (
            (await kept.expect(mqtt5.PublishPacket)).retain,
            (await cleared.expect(mqtt5.PublishPacket)).retain,
        ) == (
            True,
            False,
        )


async def test_retain_handling_decides_when_retained_messages_are_sent(port: int) -> None:
    """Test Retain Handling: 0 sends retained messages on every SUBSCRIBE, 1 for a new subscription, 2 never."""
    topic = "robot/R2/cmd"
    async with wire_client(port) as (robot, _):
        await publish(robot, topic, b"retained", retain=True)
        async with wire_client(port) as (first, _), wire_client(port) as (second, _):
            steps = [
                (first, NEVER, []),  # a new subscription, but never
                (first, IF_NEW, []),  # the subscription exists already
                (first, ALWAYS, [b"retained"]),  # exists, sent anyway
                (second, IF_NEW, [b"retained"]),  # new for this client
            ]
            for packet_id, (wire, handling, expected) in enumerate(steps, start=1):
                await subscribe(wire, plain(topic, retain_handling=handling), packet_id=packet_id)
                # A plain publish after the SUBACK: a retained message sent on SUBSCRIBE comes before it.
                await publish(robot, topic, b"marker", packet_id=packet_id + 1)
                received = [(p.payload, p.retain) for p in await until_marker(wire)]
                assert received == [(payload, True) for payload in expected], handling


async def test_subscription_identifiers_come_back_in_each_publish(port: int) -> None:
    """Test that each PUBLISH (retained ones too) carries its subscriptions' identifiers, overlapping ones in one
    copy [MQTT-3.3.4-2, 3.3.4-3], and none without one."""
    async with wire_client(port) as (robot, _):
        await publish(robot, "robot/I1/state", b"retained", retain=True)
        async with wire_client(port) as (wire, _):
            await subscribe(wire, plain("robot/I1/#"), sub_id=7)
            retained = await wire.expect(mqtt5.PublishPacket)
            assert (retained.payload, retained.subscription_ids) == (b"retained", [7])
            await subscribe(wire, plain("robot/I1/cmd"), packet_id=2, sub_id=300)
            await subscribe(wire, plain("robot/I2/cmd"), packet_id=3)
            await publish(robot, "robot/I1/cmd", b"both", packet_id=2)
            both = await wire.expect(mqtt5.PublishPacket)
            assert (both.payload, sorted(both.subscription_ids)) == (b"both", [7, 300])
            await publish(robot, "robot/I2/cmd", b"none", packet_id=3)
            unnamed = await wire.expect(mqtt5.PublishPacket)
            assert (unnamed.payload, unnamed.subscription_ids) == (b"none", [])


async def test_shared_subscription_hands_each_message_to_one_member(port: int) -> None:
    """Test that a shared subscription hands each message to one member in turn; a plain subscriber gets all."""
    shared = plain("$share/workers/robot/+/job")
    async with wire_client(port) as (first, _), wire_client(port) as (second, _), wire_client(port) as (all_, _):
        await subscribe(first, shared, plain("robot/S1/marker"))
        await subscribe(second, shared, plain("robot/S1/marker"))
        await subscribe(all_, plain("robot/+/job"), plain("robot/S1/marker"))
        async with wire_client(port) as (robot, _):
            jobs = [f"job {n}".encode() for n in range(4)]
            for packet_id, job in enumerate(jobs, start=1):
                await publish(robot, "robot/S1/job", job, packet_id=packet_id)
            await publish(robot, "robot/S1/marker", b"marker", packet_id=9)
        got_first = [p.payload for p in await until_marker(first)]
        got_second = [p.payload for p in await until_marker(second)]
        assert len(got_first) == len(got_second) == 2  # round robin
        assert sorted(got_first + got_second) == jobs
        assert [p.payload for p in await until_marker(all_)] == jobs


async def test_shared_subscription_is_granted_as_the_filter_it_shares(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that a shared subscription is granted (SUBACK) as the filter it shares would be, under a users file."""
    box = await make_box(secured_settings(tmp_path))
    login = {"username": "ROBOT-A", "password": PASSWORDS["ROBOT-A"].encode()}
    async with wire_client(box.mqtt_port, **login) as (wire, connack):
        assert connack.reason_code == mqtt5.ConnAckReasonCode.SUCCESS
        await wire.send(
            mqtt5.SubscribePacket(1, [plain("$share/g/robot/ROBOT-A/cmd"), plain("$share/g/robot/ROBOT-B/cmd")])
        )
        suback = await wire.expect(mqtt5.SubAckPacket)
        assert suback.reason_codes == [
            mqtt5.SubAckReasonCode.GRANTED_QOS_AT_MOST_ONCE,
            mqtt5.SubAckReasonCode.NOT_AUTHORIZED,
        ]


async def test_no_local_on_a_shared_subscription_is_a_protocol_error(port: int) -> None:
    """Test that No Local on a shared subscription ends the connection with DISCONNECT 0x82 [MQTT-3.8.3-4], and
    that no other filter of the same SUBSCRIBE is applied: the session, resumed, gets nothing on it."""
    session = {"client_id": "no-local-shared", "clean_start": False, "session_expiry_interval": 60}
    async with wire_client(port, **session) as (wire, _):
        await wire.send(mqtt5.SubscribePacket(1, [plain("part/a"), plain("$share/g/robot/+/cmd", no_local=True)]))
        disconnect = await wire.expect(mqtt5.DisconnectPacket)
        assert disconnect.reason_code == mqtt5.DisconnectReasonCode.PROTOCOL_ERROR
        assert await wire.closed()
    async with wire_client(port, **session) as (wire, _), wire_client(port) as (publisher, _):
        # Routed before its PUBACK: once that is back, a subscription would have had it.
        await publisher.send(mqtt5.PublishPacket("part/a", b"not for it", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=1))
        await publisher.expect(mqtt5.PubAckPacket)
        await wire.send(mqtt5.PingReqPacket())
        assert isinstance(await wire.receive(), mqtt5.PingRespPacket)  # not the PUBLISH
