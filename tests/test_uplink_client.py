"""spotbox's own MQTT 5 client against a real Mosquitto that each test starts on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import mqtt5
import pytest

from spotbox.cluster.client import BrokerURL, ConnectionLostError, LinkState, MqttClient
from spotbox.errors import ConfigError
from tests.mosquitto import Mosquitto, mosquitto, mosquitto_process

__all__ = ["mosquitto"]  # the fixture, used by name


@contextlib.asynccontextmanager
async def running(client: MqttClient) -> AsyncIterator[MqttClient]:
    """The client's connection loop for the block's duration."""
    task = asyncio.create_task(client.run(), name="test-uplink")
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_broker_urls_parse_and_bad_ones_name_the_option() -> None:
    """Test that mqtt:// and mqtts:// URLs parse with defaults, and a bad one is a ConfigError naming the option."""
    url = BrokerURL.parse("mqtts://gw%201:s3cret@cloud.example", "--forward")
    assert (url.host, url.port, url.tls, url.username, url.password) == ("cloud.example", 8883, True, "gw 1", "s3cret")
    assert "s3cret" not in str(url)
    assert BrokerURL.parse("mqtt://127.0.0.1", "--forward").port == 1883
    for bad in ("http://x", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ConfigError, match="--forward"):
            BrokerURL.parse(bad, "--forward")


async def test_publish_returns_after_the_brokers_puback_and_subscribers_get_it(mosquitto: Mosquitto) -> None:
    """Test that a QoS 1 publish with user properties reaches an MQTT 5 subscriber once the broker acknowledged it."""
    async with aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as watcher:
        await watcher.subscribe("cloud/#", qos=1)
        client = MqttClient(BrokerURL.parse(mosquitto.url, "--forward"), "gw-test")
        async with running(client):
            async with asyncio.timeout(5):
                await client.wait_connected()
                await client.publish("cloud/robot/R1/status", b'{"a": 1}', user_properties=[("row_id", "7")])
            assert client.state is LinkState.UP
            async with asyncio.timeout(5):
                message = await anext(watcher.messages)
    assert message.payload == b'{"a": 1}'
    assert getattr(message.properties, "UserProperty", None) == [("row_id", "7")]


async def test_acknowledgements_go_out_in_arrival_order(mosquitto: Mosquitto) -> None:
    """Test that acking later messages before the first sends no PUBACK: after a reconnect the broker resends all."""
    url = BrokerURL.parse(mosquitto.url, "--broker")
    subscribe = [mqtt5.TopicFilter("in/#", max_qos=mqtt5.QoS.AT_LEAST_ONCE)]
    client = MqttClient(url, "ordered", clean_start=False, session_expiry=300, subscriptions=subscribe)
    async with running(client):
        async with asyncio.timeout(5):
            await client.wait_connected()
            await asyncio.sleep(0.2)  # let the SUBACK arrive before publishing
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as publisher:
            for n in range(3):
                await publisher.publish("in/x", f"m{n}".encode(), qos=1)
        async with asyncio.timeout(5):
            first, second, third = [await client.deliveries.get() for _ in range(3)]
        second.ack()
        third.ack()  # the first is still being handled: no PUBACK may go out yet
        assert client._connection is not None
        client._connection.close("test: connection cut")  # the crash of the holder of the messages
        async with asyncio.timeout(10):
            again = [await client.deliveries.get() for _ in range(3)]
    assert [d.packet.payload for d in again] == [b"m0", b"m1", b"m2"]
    assert all(d.packet.duplicate for d in again)
    assert first.packet.payload == b"m0"


async def test_a_silent_link_is_noticed_and_publishing_resumes_after_it(tmp_path: Path) -> None:
    """Test that a frozen broker (no FIN, no RST) ends the connection by keep alive, and a resend then succeeds."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        client = MqttClient(BrokerURL.parse(broker.url, "--forward"), "silent", keep_alive=1, backoff_first_s=0.1)
        async with running(client):
            async with asyncio.timeout(5):
                await client.wait_connected()
            broker.freeze()
            with pytest.raises(ConnectionLostError):
                async with asyncio.timeout(10):
                    await client.publish("cloud/x", b"held")
            assert client.state is not LinkState.UP
            assert client.last_error is not None
            broker.thaw()
            async with asyncio.timeout(15):
                await client.publish("cloud/x", b"after")
            assert client.connected
            assert client.connects >= 2


async def test_a_refused_login_is_reported_and_retried(tmp_path: Path) -> None:
    """Test that a broker refusing the CONNECT leaves the link down with the refusal as its last error."""
    with mosquitto_process(tmp_path, extra="") as broker:
        broker.config.write_text(broker.config.read_text().replace("allow_anonymous true", "allow_anonymous false"))
        await broker.start()
        client = MqttClient(BrokerURL.parse(broker.url, "--forward"), "refused", backoff_first_s=0.05)
        async with running(client):
            async with asyncio.timeout(5):
                while client.last_error is None:
                    await client.wait_changed()
            assert client.state is not LinkState.UP
            assert "CONNECT refused" in client.last_error
            assert not client.connected


async def test_a_connection_to_itself_is_dropped_and_the_port_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that when a reconnect reaches itself (TCP simultaneous open: the broker on this host is down and the
    connect got the broker's port as its own), the link drops it at once and the broker can bind its port again."""
    own = socket.socket()
    own.bind(("127.0.0.1", 0))
    port = own.getsockname()[1]
    own.connect(("127.0.0.1", port))  # Linux lets a socket reach itself: the fault to inject
    real_open = asyncio.open_connection

    async def itself(*_args: object, **kwargs: object) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await real_open(sock=own, limit=kwargs.get("limit", 2**16))  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "open_connection", itself)
    client = MqttClient(BrokerURL.parse(f"mqtt://127.0.0.1:{port}", "--forward"), "self", backoff_first_s=0.05)
    async with running(client):
        async with asyncio.timeout(5):
            while client.last_error is None:
                await client.wait_changed()
        assert "connected to itself" in client.last_error
        assert client.state is not LinkState.UP
    assert own.fileno() == -1  # closed: the port is the broker's again
    with socket.socket() as broker:
        broker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as brokers bind (Mosquitto does)
        broker.bind(("127.0.0.1", port))
        broker.listen()
