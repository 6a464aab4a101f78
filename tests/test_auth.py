"""spotbox run --users: every MQTT client logs in, and each user publishes and subscribes only where granted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import aiomqtt
import orjson
import pytest

from spotbox.loadgen import connect_packet
from spotbox.runtime import load_runtime
from spotbox.settings import Settings
from spotbox.users import Users
from tests.conftest import Box
from tests.helpers import known_user, mqtt_client, payload, stamp
from tests.raw_mqtt import CONNACK_ACCEPTED, CONNACK_NOT_AUTHORIZED, raw_client

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

PASSWORDS = {"ROBOT-A": "pw-a", "ROBOT-B": "pw-b", "operator": "pw-op"}
TRANSPORTS = [("tcp", None), ("websockets", "/mqtt")]


def write_users(path: Path) -> Path:
    """A users file with two robots and an operator who may watch every robot and command them."""
    users = Users(path)
    for name in ("ROBOT-A", "ROBOT-B"):
        users = users.with_user(known_user(name, PASSWORDS[name]))
    operator = known_user("operator", PASSWORDS["operator"], publish=["robot/+/cmd"], subscribe=["robot/#"])
    users.with_user(operator).save()
    return path


def secured_settings(tmp_path: Path) -> Settings:
    """Settings of a spotbox that requires users (SQLite: access control does not depend on the database)."""
    return Settings(
        http_port=0,
        mqtt_port=0,
        database_url=f"sqlite:///{tmp_path / 'spotbox.db'}",
        batch_wait_ms=1.0,
        users_path=write_users(tmp_path / "users.json"),
    )


def port_for(box: Box, transport: str) -> int:
    """The MQTT port for TCP, the HTTP port (/mqtt) for WebSocket."""
    port = box.mqtt_port if transport == "tcp" else box.server.port
    assert port is not None
    return port


def operator_login() -> dict[str, str]:
    """HTTP Basic headers of the operator, who may read every robot."""
    return {"Authorization": aiohttp.encode_basic_auth("operator", PASSWORDS["operator"])}


def login(name: str) -> dict[str, str]:
    return {"username": name, "password": PASSWORDS[name]}


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("ROBOT-A", "wrong"), ("ROBOT-Z", "pw-a"), ("ROBOT-A", None)],
    ids=["anonymous", "wrong-password", "unknown-user", "no-password"],
)
async def test_bad_login_gets_connack_not_authorized(secured: Box, username: str | None, password: str | None) -> None:
    """Test that anonymous, unknown-user and wrong-password CONNECTs are answered with CONNACK 5 and closed."""
    async with raw_client(secured.mqtt_port) as client:
        await client.send(connect_packet("raw-1", username=username, password=password))
        async with asyncio.timeout(10):
            assert await client.connack() == CONNACK_NOT_AUTHORIZED
            await client.wait_closed_by_server()


async def test_right_login_gets_connack_accepted(secured: Box) -> None:
    """Test that a user with its password is accepted (the same raw client, so the refusals above are real)."""
    async with raw_client(secured.mqtt_port) as client:
        await client.send(connect_packet("raw-2", username="ROBOT-A", password=PASSWORDS["ROBOT-A"]))
        async with asyncio.timeout(10):
            assert await client.connack() == CONNACK_ACCEPTED


@pytest.mark.parametrize(("transport", "path"), TRANSPORTS)
async def test_login_on_both_transports(secured: Box, transport: str, path: str | None) -> None:
    """Test that over TCP and WebSocket a wrong password is refused and the right one publishes a stored status."""
    port = port_for(secured, transport)
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with mqtt_client(port, transport=transport, path=path, username="ROBOT-A", password=PASSWORDS["ROBOT-B"]):
            pass
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with mqtt_client(port, transport=transport, path=path):
            pass
    async with mqtt_client(port, transport=transport, path=path, **login("ROBOT-A")) as robot:
        await robot.publish("robot/ROBOT-A/status", payload(timestamp=stamp(1)), qos=1)
    assert [item["ts"] for item in await secured.history("ROBOT-A")] == [stamp(1)]


async def test_robot_cannot_publish_as_another_robot(secured: Box) -> None:
    """Test that a status published by ROBOT-A on ROBOT-B's topic is acknowledged but neither stored nor routed."""
    async with (
        mqtt_client(secured.mqtt_port, **login("operator")) as operator,
        mqtt_client(secured.mqtt_port, **login("ROBOT-A")) as robot_a,
    ):
        await operator.subscribe("robot/#", qos=1)
        # QoS 1: the PUBACK comes back (3.1.1 has no refusal), the message goes nowhere.
        await robot_a.publish("robot/ROBOT-B/status", payload(timestamp=stamp(1)), qos=1)
        await robot_a.publish("robot/ROBOT-A/status", payload(timestamp=stamp(2)), qos=1)
        async with asyncio.timeout(10):
            message = await anext(operator.messages)
    # Routing keeps order per publisher: had the forged status been routed, it would have come first.
    assert str(message.topic) == "robot/ROBOT-A/status"
    assert orjson.loads(message.payload)["timestamp"] == stamp(2)
    assert await secured.history("ROBOT-B") == []
    assert len(await secured.history("ROBOT-A")) == 1


async def test_subscriptions_are_limited_to_grants(secured: Box) -> None:
    """Test that a robot gets SUBACK 0x80 outside robot/{name}/#, and an operator gets what the file grants."""
    async with mqtt_client(secured.mqtt_port, **login("ROBOT-A")) as robot_a:
        assert list(await robot_a.subscribe("robot/ROBOT-B/#", qos=1)) == [0x80]
        assert list(await robot_a.subscribe("robot/+/status", qos=1)) == [0x80]
        assert list(await robot_a.subscribe("#", qos=1)) == [0x80]
        assert list(await robot_a.subscribe("robot/ROBOT-A/#", qos=1)) == [1]
        async with mqtt_client(secured.mqtt_port, **login("operator")) as operator:
            assert list(await operator.subscribe("robot/+/status", qos=1)) == [1]
            assert list(await operator.subscribe("spotbox/rejected/#", qos=1)) == [0x80]
            # The operator's publish grant reaches the robot's command topic, inside the robot's own subscription.
            await operator.publish("robot/ROBOT-A/cmd", b"dock", qos=1)
        async with asyncio.timeout(10):
            message = await anext(robot_a.messages)
    assert (str(message.topic), message.payload) == ("robot/ROBOT-A/cmd", b"dock")


async def test_denied_publish_to_other_topic_is_not_routed(secured: Box) -> None:
    """Test that a robot publishing a command to another robot is dropped, while the operator's command arrives."""
    async with (
        mqtt_client(secured.mqtt_port, **login("ROBOT-B")) as robot_b,
        mqtt_client(secured.mqtt_port, **login("ROBOT-A")) as robot_a,
        mqtt_client(secured.mqtt_port, **login("operator")) as operator,
    ):
        await robot_b.subscribe("robot/ROBOT-B/cmd", qos=1)
        await robot_a.publish("robot/ROBOT-B/cmd", b"forged", qos=1)
        await operator.publish("robot/ROBOT-B/cmd", b"real", qos=1)
        async with asyncio.timeout(10):
            message = await anext(robot_b.messages)
    assert message.payload == b"real"


def test_users_allow_a_public_mqtt_address(tmp_path: Path) -> None:
    """Test that with a users file a non-loopback --mqtt-host is accepted (without one it is refused)."""
    users = load_runtime(Settings(mqtt_host="0.0.0.0", users_path=write_users(tmp_path / "users.json"))).users
    assert users is not None
    assert set(users.by_name) == set(PASSWORDS)


def test_an_empty_or_missing_users_file_is_refused(tmp_path: Path) -> None:
    """Test that --users naming a missing file, or one without users, is a configuration error."""
    with pytest.raises(Exception, match="no such file"):
        load_runtime(Settings(users_path=tmp_path / "missing.json"))
    Users(tmp_path / "empty.json").save()
    with pytest.raises(Exception, match="has no users"):
        load_runtime(Settings(users_path=tmp_path / "empty.json"))


@pytest.mark.parametrize(
    "credentials",
    [(None, None), ("ROBOT-A", "wrong"), ("ROBOT-B", PASSWORDS["ROBOT-B"])],
    ids=["anonymous", "wrong-password", "other-user"],
)
async def test_refused_client_cannot_take_over_a_session(
    secured: Box, credentials: tuple[str | None, str | None]
) -> None:
    """Test that a CONNECT with a robot's client id but not its login neither disconnects it nor takes its session."""
    async with (
        mqtt_client(secured.mqtt_port, identifier="robot-a", **login("ROBOT-A")) as robot_a,
        mqtt_client(secured.mqtt_port, **login("operator")) as operator,
    ):
        await robot_a.subscribe("robot/ROBOT-A/cmd", qos=1)
        async with raw_client(secured.mqtt_port) as intruder:
            await intruder.send(connect_packet("robot-a", username=credentials[0], password=credentials[1]))
            async with asyncio.timeout(10):
                assert await intruder.connack() == CONNACK_NOT_AUTHORIZED
                await intruder.wait_closed_by_server()
        # The robot is still connected, still subscribed, and still stores its statuses.
        await operator.publish("robot/ROBOT-A/cmd", b"still-there", qos=1)
        async with asyncio.timeout(10):
            message = await anext(robot_a.messages)
        await robot_a.publish("robot/ROBOT-A/status", payload(timestamp=stamp(5)), qos=1, timeout=10)
    assert message.payload == b"still-there"
    assert [item["ts"] for item in await secured.history("ROBOT-A")] == [stamp(5)]


async def test_routing_survives_subscriptions_changing_while_it_runs(secured: Box) -> None:
    """Test that clients subscribing while messages are routed (topic filtering awaits per subscriber) do not
    stop the broker routing: a message published afterwards still arrives."""
    async with (
        mqtt_client(secured.mqtt_port, **login("operator")) as watcher,
        mqtt_client(secured.mqtt_port, **login("operator")) as commander,
    ):
        for n in range(20):
            await watcher.subscribe(f"robot/R{n}/cmd")

        async def churn() -> None:
            for n in range(200):
                await watcher.subscribe(f"robot/NEW{n}/cmd")

        async def command() -> None:
            for _ in range(200):
                await commander.publish("robot/R1/cmd", b"go")

        await asyncio.gather(churn(), command())
        await watcher.subscribe("robot/PROBE/cmd", qos=1)
        await commander.publish("robot/PROBE/cmd", b"probe", qos=1)
        async with asyncio.timeout(10):
            async for message in watcher.messages:
                if str(message.topic) == "robot/PROBE/cmd":
                    break


@pytest.mark.parametrize("version", ["3.1.1", "5"])
@pytest.mark.parametrize(
    ("user", "will_topic", "accepted"),
    [
        ("ROBOT-A", "robot/ROBOT-B/status", False),  # another robot's status, past validation
        ("ROBOT-A", "robot/ROBOT-A/status", False),  # even its own: a will is never validated or stored
        ("ROBOT-A", "robot/ROBOT-B/cmd", False),  # outside its grants
        ("operator", "robot/ROBOT-B/cmd", True),  # granted robot/+/cmd
    ],
)
async def test_a_will_must_be_publishable_by_its_user(
    secured: Box, version: str, user: str, will_topic: str, accepted: bool
) -> None:
    """Test that a CONNECT whose will the user may not publish (or that targets a status topic) is refused."""
    will = aiomqtt.Will(will_topic, b'{"battery_level": 999}')
    if accepted:
        async with mqtt_client(secured.mqtt_port, version, will=will, **login(user)):
            return
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with mqtt_client(secured.mqtt_port, version, will=will, **login(user)):
            pass
    assert refused.value.rc in (5, 135)  # 3.1.1: not authorized; 5: 0x87 Not authorized


async def test_local_mode_refuses_a_will_on_a_status_topic(box: Box) -> None:
    """Test that without users a will on `robot/{serial}/status` is still refused (it would skip validation)."""
    with pytest.raises(aiomqtt.MqttCodeError):
        async with mqtt_client(box.mqtt_port, will=aiomqtt.Will("robot/R1/status", b"{}")):
            pass
    async with mqtt_client(box.mqtt_port, will=aiomqtt.Will("robot/R1/online", b"false")):
        pass
