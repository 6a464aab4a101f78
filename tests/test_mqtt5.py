"""MQTT 5.0 on spotbox's broker: CONNECT/CONNACK, PUBLISH acknowledgements with reason codes, and rejection
before routing, as paho-mqtt (MQTTv5), mosquitto_pub/mosquitto_sub (-V mqttv5) and a bare codec client see them."""

from __future__ import annotations

import asyncio

import aiomqtt
import mqtt5
import orjson
import pytest

from spotbox.keys import SETTINGS
from spotbox.mqtt.broker import TOPIC_ALIAS_MAX
from tests.cases import INVALID
from tests.conftest import Box, require_tool
from tests.helpers import mqtt_client, payload, stamp
from tests.mqtt5_clients import paho_v5, reason_string, wire_client
from tests.test_auth import PASSWORDS, TRANSPORTS, login, port_for

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

STATUS = "robot/{}/status"


async def test_connack_carries_what_spotbox_offers(box: Box) -> None:
    """Test that an MQTT 5 CONNECT with an empty client id gets CONNACK success with the server's properties."""
    async with wire_client(box.mqtt_port, client_id="", keep_alive=0) as (_, connack):
        assert connack.reason_code == mqtt5.ConnAckReasonCode.SUCCESS
        assert not connack.session_present
        assert connack.assigned_client_id  # [MQTT-3.2.2-16]
        settings = box.server.app[SETTINGS]
        assert connack.server_keep_alive == settings.max_keepalive
        assert connack.receive_max == settings.receive_maximum
        assert connack.topic_alias_max == TOPIC_ALIAS_MAX
        assert connack.max_packet_size == box.broker.limits.max_packet + 5
        assert connack.retain_available
        assert connack.shared_subscription_available
        assert connack.subscription_id_available
    async with wire_client(box.mqtt_port, client_id="kept-id", keep_alive=30) as (_, connack):
        assert connack.assigned_client_id is None
        assert connack.server_keep_alive == 30


@pytest.mark.parametrize(("transport", "path"), TRANSPORTS)
async def test_invalid_status_gets_puback_0x99_and_reaches_no_subscriber(
    box: Box, transport: str, path: str | None
) -> None:
    """Test that paho (MQTT 5) gets PUBACK 0x99 naming the field for an invalid status, which no subscriber of
    either version sees, while the valid status after it is stored and delivered to both."""
    port = port_for(box, transport)
    async with (
        mqtt_client(box.mqtt_port, "3.1.1") as old,
        mqtt_client(box.mqtt_port, "5") as new,
        paho_v5(port, transport) as robot,
    ):
        await old.subscribe("robot/+/status", qos=1)
        await new.subscribe("robot/+/status", qos=1)
        code, properties = await robot.publish(STATUS.format("R5"), payload(battery_level=150), qos=1)
        assert code.value == 0x99
        assert reason_string(properties) == "battery_level: 150 is greater than the maximum of 100"
        code, _ = await robot.publish(STATUS.format("R5"), payload(battery_level=42), qos=1)
        assert code.value == 0
        for subscriber in (old, new):
            async with asyncio.timeout(10):
                message = await anext(aiter(subscriber.messages))
            assert isinstance(message.payload, bytes)
            assert orjson.loads(message.payload)["battery_level"] == 42
    assert [item["battery_level"] for item in await box.history("R5")] == [42]


async def test_every_rule_of_section_4_gets_0x99_with_its_field(box: Box) -> None:
    """Test that each invalid case of tests/cases.py published over MQTT 5 at QoS 1 gets 0x99 naming its field,
    and that a subscriber of robot/+/status receives exactly the valid message sent last."""
    async with mqtt_client(box.mqtt_port, "5") as watcher, paho_v5(box.mqtt_port) as robot:
        await watcher.subscribe("robot/+/status", qos=1)
        for name, doc, field in INVALID:
            code, properties = await robot.publish(STATUS.format("R6"), orjson.dumps(doc), qos=1)
            assert code.value == 0x99, name
            reason = reason_string(properties)
            assert reason is not None
            assert reason.split(":")[0] == field, name
        code, _ = await robot.publish(STATUS.format("R6"), payload(battery_level=7), qos=1)
        assert code.value == 0
        async with asyncio.timeout(10):
            message = await anext(aiter(watcher.messages))
        assert isinstance(message.payload, bytes)
        assert orjson.loads(message.payload)["battery_level"] == 7
    assert [item["battery_level"] for item in await box.history("R6")] == [7]


async def test_qos2_invalid_status_gets_pubrec_0x99_and_valid_completes(box: Box) -> None:
    """Test that an invalid status at QoS 2 gets PUBREC 0x99 (ending the flow), and a valid one PUBREC, PUBCOMP."""
    async with wire_client(box.mqtt_port) as (wire, _):
        await wire.send(
            mqtt5.PublishPacket(
                STATUS.format("R7"), payload(battery_status="FULL"), qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=1
            )
        )
        pubrec = await wire.expect(mqtt5.PubRecPacket)
        assert (pubrec.packet_id, pubrec.reason_code) == (1, mqtt5.PubRecReasonCode.PAYLOAD_FORMAT_INVALID)
        assert pubrec.reason_str is not None
        assert pubrec.reason_str.startswith("battery_status:")
        await wire.send(mqtt5.PublishPacket(STATUS.format("R7"), payload(), qos=mqtt5.QoS.EXACTLY_ONCE, packet_id=2))
        pubrec = await wire.expect(mqtt5.PubRecPacket)
        assert (pubrec.packet_id, pubrec.reason_code) == (2, mqtt5.PubRecReasonCode.SUCCESS)
        await wire.send(mqtt5.PubRelPacket(2))
        pubcomp = await wire.expect(mqtt5.PubCompPacket)
        assert (pubcomp.packet_id, pubcomp.reason_code) == (2, mqtt5.PubCompReasonCode.SUCCESS)
        # A PUBREL for the refused message (or any unknown id) is answered "packet identifier not found".
        await wire.send(mqtt5.PubRelPacket(1))
        pubcomp = await wire.expect(mqtt5.PubCompPacket)
        assert pubcomp.reason_code == mqtt5.PubCompReasonCode.PACKET_ID_NOT_FOUND
    assert len(await box.history("R7")) == 1


async def test_reason_string_only_when_problem_information_is_requested(box: Box) -> None:
    """Test that a client that asked for no problem information gets 0x99 without a reason string."""
    async with wire_client(box.mqtt_port, request_problem_info=False) as (wire, _):
        await wire.send(
            mqtt5.PublishPacket(STATUS.format("R8"), b"{not json", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=9)
        )
        puback = await wire.expect(mqtt5.PubAckPacket)
        assert puback.reason_code == mqtt5.PubAckReasonCode.PAYLOAD_FORMAT_INVALID
        assert puback.reason_str is None


async def test_mosquitto_pub_v5_sees_rejection_and_stores_valid(box: Box) -> None:
    """Test that mosquitto_pub -V mqttv5 stores a valid status and reports 0x99 with the reason for an invalid one,
    and that mosquitto_sub -V mqttv5 receives the valid one."""
    mosquitto_pub, mosquitto_sub = require_tool("mosquitto_pub"), require_tool("mosquitto_sub")
    common = ["-p", str(box.mqtt_port), "-V", "mqttv5", "-q", "1", "-t", STATUS.format("R9")]
    # Line-buffered, so that its "received SUBACK" line is read as soon as it is printed.
    sub = await asyncio.create_subprocess_exec(
        require_tool("stdbuf"),
        "-oL",
        mosquitto_sub,
        *common,
        "-C",
        "1",
        "-d",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(10):
            assert sub.stdout is not None
            while b"SUBACK" not in await sub.stdout.readline():
                pass
        bad = await asyncio.create_subprocess_exec(
            mosquitto_pub, *common, "-m", payload(battery_level=0).decode(), stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(10):
            _, err = await bad.communicate()
        assert "Payload format invalid" in err.decode()
        assert "battery_level: 0 is less than the minimum of 1" in err.decode()
        good = await asyncio.create_subprocess_exec(mosquitto_pub, *common, "-m", payload(timestamp=stamp(1)).decode())
        async with asyncio.timeout(10):
            assert await good.wait() == 0
            out, _ = await sub.communicate()
        received = [line for line in out.decode().splitlines() if line.startswith("{")]
        assert [orjson.loads(line)["timestamp"] for line in received] == [stamp(1)]
    finally:
        if sub.returncode is None:
            sub.kill()
            await sub.wait()
    assert len(await box.history("R9")) == 1


async def test_login_refusals_have_mqtt5_reason_codes(secured: Box) -> None:
    """Test that with --users a wrong password gets CONNACK 0x86 and an anonymous client 0x87, on both transports."""
    async with wire_client(secured.mqtt_port, username="ROBOT-A", password=b"wrong") as (wire, connack):
        assert connack.reason_code == mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD
        assert await wire.closed()
    async with wire_client(secured.mqtt_port) as (wire, connack):
        assert connack.reason_code == mqtt5.ConnAckReasonCode.NOT_AUTHORIZED
        assert await wire.closed()
    for transport, path in TRANSPORTS:
        with pytest.raises(aiomqtt.MqttCodeError) as refused:
            async with mqtt_client(
                port_for(secured, transport),
                "5",
                transport=transport,
                path=path,
                username="ROBOT-A",
                password=PASSWORDS["ROBOT-B"],
            ):
                pass
        assert refused.value.rc == 0x86


async def test_denied_publish_gets_0x87(secured: Box) -> None:
    """Test that a publish outside the user's grants gets PUBACK 0x87 and is not stored."""
    async with paho_v5(secured.mqtt_port, **login("ROBOT-A")) as robot:
        code, properties = await robot.publish(STATUS.format("ROBOT-B"), payload(), qos=1)
        assert code.value == 0x87
        assert "may not publish" in (reason_string(properties) or "")
        code, _ = await robot.publish(STATUS.format("ROBOT-A"), payload(), qos=1)
        assert code.value == 0
    assert await secured.history("ROBOT-B") == []
    assert len(await secured.history("ROBOT-A")) == 1


async def test_denied_subscription_gets_0x87(secured: Box) -> None:
    """Test that a subscription outside the user's grants gets SUBACK 0x87 while a granted one is given its QoS."""
    async with wire_client(secured.mqtt_port, username="ROBOT-A", password=PASSWORDS["ROBOT-A"].encode()) as (wire, _):
        filters = [mqtt5.TopicFilter("robot/ROBOT-B/#"), mqtt5.TopicFilter("robot/ROBOT-A/#", max_qos=mqtt5.QoS(1))]
        await wire.send(mqtt5.SubscribePacket(1, filters))
        suback = await wire.expect(mqtt5.SubAckPacket)
        assert suback.reason_codes == [
            mqtt5.SubAckReasonCode.NOT_AUTHORIZED,
            mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE,
        ]


async def test_reason_strings_name_each_field_briefly(box: Box) -> None:
    """Test that 0x99 reason strings name the missing field itself, a repeated key, an unstorable number, and stay
    within 200 characters for a 1 MB value."""
    cases = [
        (b'{"battery_level": 50}', "battery_status: is required"),
        (b'{"battery_level": 150, ' + payload()[1:], "battery_level: is a duplicate key"),
        (payload().replace(b'"latitude":52.52', b'"latitude":1e-999999'), "location.latitude: 1e-999999 rounds to 0"),
        (payload(battery_status=["CHARGING"] * 80_000), 'battery_status: an array of 80000 items is not one of ["'),
    ]
    async with paho_v5(box.mqtt_port) as robot:
        for raw, expected in cases:
            code, properties = await robot.publish(STATUS.format("R7"), raw, qos=1)
            assert code.value == 0x99
            reason = reason_string(properties)
            assert reason is not None
            assert reason.startswith(expected), reason
            assert len(reason) <= 200
    assert await box.history("R7") == []
