"""Store and forward: every stored status reaches an upstream Mosquitto (the test's own), whatever the uplink does."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from spotbox.keys import RETENTION
from spotbox.settings import Settings
from spotbox.storage import open_storage
from spotbox.storage.base import HistoryQuery
from tests.conftest import SPOTBOX, Box, BoxFactory, require_tool
from tests.helpers import payload, raw_publisher, status
from tests.mosquitto import Mosquitto, free_port, mosquitto_process

PREFIX = "cloud/gw1/"


@dataclass
class Receiver:
    """The cloud side: a persistent MQTT 5 session that records every forwarded status, reconnecting as needed."""

    port: int
    rows: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    properties: list[dict[str, str]] = field(default_factory=list)
    payloads: dict[int, dict[str, Any]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def distinct(self) -> set[int]:
        return {row for rows in self.rows.values() for row in rows}

    async def run(self) -> None:
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = 600
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier="cloud-receiver",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=connect,
                ) as client:
                    await client.subscribe(f"{PREFIX}robot/+/status", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        props = dict(getattr(message.properties, "UserProperty", []))
                        row = int(props["row_id"])
                        self.rows[str(message.topic).split("/")[-2]].append(row)
                        self.properties.append(props)
                        assert isinstance(message.payload, bytes)
                        self.payloads[row] = orjson.loads(message.payload)
                        self.arrived.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    async def wait_for(self, count: int, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.distinct) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def receiving(port: int) -> AsyncIterator[Receiver]:
    """A Receiver running for the block's duration."""
    receiver = Receiver(port)
    task = asyncio.create_task(receiver.run(), name="cloud-receiver")
    try:
        yield receiver
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def cloud(tmp_path: Path) -> contextlib.AbstractContextManager[Mosquitto]:
    """An upstream Mosquitto that keeps its sessions and their queued messages across a restart."""
    store = tmp_path / "cloud-store"
    store.mkdir(exist_ok=True)
    return mosquitto_process(tmp_path, extra=f"persistence true\npersistence_location {store}/\nautosave_interval 1\n")


def forwarding(tmp_path: Path, broker: Mosquitto, **changes: Any) -> Settings:
    """Settings of a spotbox on port 0 forwarding to `broker` with a short keep alive."""
    values: dict[str, Any] = {
        "http_port": 0,
        "mqtt_port": 0,
        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
        "batch_wait_ms": 1.0,
        "forward": (broker.url,),
        "forward_prefix": PREFIX,
        "gateway_id": "gw1",
        "forward_keepalive": 1,
    }
    return Settings(**(values | changes))


async def publish_fleet(box: Box, robots: int, each: int, start: int = 0) -> None:
    """`robots` robots publish `each` QoS 1 statuses over MQTT; returns once all are acknowledged (so stored)."""

    async def one(robot: int) -> None:
        async with raw_publisher(box.mqtt_port, f"R{robot:02d}") as publisher:
            numbers = range(start + robot * 2000, start + robot * 2000 + each)
            await publisher.publish_many(numbers)
            await publisher.acked_ids(each)

    await asyncio.gather(*(one(robot) for robot in range(robots)))


async def forward_state(box: Box) -> dict[str, Any]:
    """The one target of GET /forward."""
    async with box.http.get(f"{box.base_url}/forward") as resp:
        assert resp.status == 200
        [target] = (await resp.json())["targets"]
        return dict(target)


async def forward_state_when(box: Box, condition: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """GET /forward's target once `condition` holds (the state is refreshed twice a second)."""
    async with asyncio.timeout(15):
        # Polling an HTTP route: there is no event to wait on.
        while not condition(state := await forward_state(box)):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    return state


def assert_in_order_per_robot(receiver: Receiver) -> None:
    """Each robot's rows, by first arrival, come in row id order (resends may repeat, never reorder)."""
    for serial, rows in receiver.rows.items():
        first_seen = list(dict.fromkeys(rows))
        assert first_seen == sorted(first_seen), serial


async def test_every_status_is_forwarded_with_its_row_id_in_order(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that statuses stored before and after an upstream outage all arrive upstream, in order per robot."""
    with cloud(tmp_path) as broker:
        await broker.start()
        async with receiving(broker.port) as receiver:
            box = await make_box(forwarding(tmp_path, broker))
            await publish_fleet(box, robots=10, each=50)
            await receiver.wait_for(500)
            broker.stop()  # the uplink goes away; ingest goes on
            await publish_fleet(box, robots=10, each=50, start=1000)
            state = await forward_state(box)
            async with box.http.get(f"{box.base_url}/ready") as resp:
                assert resp.status == 200, "an uplink outage must not make the gateway unready"
            await broker.start()
            await receiver.wait_for(1000)
            stored = await box.storage.statuses_after(0, 5000)
    assert len(stored) == 1000
    assert receiver.distinct == {row.id for row in stored}
    assert_in_order_per_robot(receiver)
    assert state["state"] != "up"
    assert all(props["gateway"] == "gw1" for props in receiver.properties)
    first = stored[0]
    assert receiver.payloads[first.id]["serial_number"] == first.record.serial_number
    assert receiver.payloads[first.id]["payload"]["timestamp"] == orjson.loads(first.record.payload)["timestamp"]


async def test_forward_state_and_metrics_show_the_lag_until_it_drains(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that GET /forward and /metrics show the link, the lag while the uplink is down, and zero once caught up."""
    with cloud(tmp_path) as broker:
        await broker.start()
        async with receiving(broker.port) as receiver:
            await receiver.subscribed.wait()  # the cloud keeps this session, and what is queued for it, over restarts
            broker.stop()
            box = await make_box(forwarding(tmp_path, broker))
            await publish_fleet(box, robots=2, each=20)
            down = await forward_state_when(box, lambda state: state["lag_rows"] == 40)
            async with box.http.get(f"{box.base_url}/metrics") as resp:
                metrics = await resp.text()
            await broker.start()
            await receiver.wait_for(40)
            up = await forward_state_when(box, lambda state: state["lag_rows"] == 0)
    assert down["state"] != "up"
    assert down["lag_seconds"] > 0
    assert down["forwarded"] == 0
    assert f'spotbox_forward_lag_rows{{target="{broker.url}"}} 40.0' in metrics
    assert f'spotbox_forward_up{{target="{broker.url}"}} 0.0' in metrics
    assert up["state"] == "up"
    assert up["forwarded"] == 40
    assert up["cursor"] > 0


async def test_a_silent_uplink_during_catch_up_loses_nothing(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that a frozen upstream broker (SIGSTOP: no FIN, no RST) is noticed and delivery resumes when it thaws."""
    with cloud(tmp_path) as broker:
        await broker.start()
        async with receiving(broker.port) as receiver:
            box = await make_box(forwarding(tmp_path, broker, forward_rate=400.0))
            await publish_fleet(box, robots=4, each=200)
            await receiver.wait_for(50)
            broker.freeze()  # mid catch-up: 800 rows at 400/s
            frozen = await forward_state_when(box, lambda state: state["state"] != "up")
            cursor_while_frozen = frozen["cursor"]
            broker.thaw()
            await receiver.wait_for(800)
    assert cursor_while_frozen < 800
    assert len(receiver.distinct) == 800
    assert_in_order_per_robot(receiver)


async def test_a_refused_login_is_reported_and_ingest_goes_on(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that an upstream broker refusing the login shows on GET /forward while statuses are still stored."""
    with mosquitto_process(tmp_path, extra="") as broker:
        broker.config.write_text(broker.config.read_text().replace("allow_anonymous true", "allow_anonymous false"))
        await broker.start()
        box = await make_box(forwarding(tmp_path, broker))
        await publish_fleet(box, robots=1, each=5)
        state = await forward_state_when(box, lambda state: state["last_error"] is not None)
    assert state["state"] != "up"
    assert "CONNECT refused" in state["last_error"]
    assert len(await box.history("R00")) == 5


async def test_retention_keeps_what_is_not_forwarded_unless_told(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that old statuses not yet acknowledged upstream survive retention, and --forward-may-drop deletes them."""
    old = f"{datetime.now(UTC) - timedelta(days=30):%Y-%m-%dT%H:%M:%S}"
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    for may_drop, left in ((False, 3), (True, 1)):  # retention always keeps the newest row (SQLite id reuse)
        path = tmp_path / f"r{may_drop}.db"
        settings = Settings(
            http_port=0,
            mqtt_port=0,
            database_url=f"sqlite:///{path}",
            forward=(nowhere,),
            forward_may_drop=may_drop,
            retention_days=1,
            retention_interval_s=0.05,
        )
        box = await make_box(settings)
        for n in range(3):
            async with box.http.post(f"{box.base_url}/robots/OLD/status", json=status(timestamp=f"{old}.{n}Z")) as resp:
                assert resp.status == 202
        retention = box.server.app[RETENTION]
        await retention.wait_passes(retention.passes + 2)
        assert len(await box.history("OLD")) == left


@pytest.mark.slow  # two spotbox processes in turn and a Mosquitto; the full-scale run kills one too
async def test_a_killed_gateway_resumes_from_its_saved_cursor(tmp_path: Path) -> None:
    """Test that after kill -9 of `spotbox run` mid-forwarding, a restart sends what the cloud has not acknowledged."""
    with cloud(tmp_path) as broker:
        await broker.start()
        database = tmp_path / "gw.db"
        async with receiving(broker.port) as receiver:
            first = await _start_gateway(tmp_path, database, broker, rate=300)
            try:
                port = first[1]
                async with _publisher_fleet(port, robots=5, each=200):
                    pass
                await receiver.wait_for(100)
            finally:
                first[0].send_signal(signal.SIGKILL)
                first[0].wait(10)
            second = await _start_gateway(tmp_path, database, broker, rate=5000)
            try:
                await receiver.wait_for(1000)
            finally:
                second[0].terminate()
                second[0].wait(10)
        storage = open_storage(Settings(database_url=f"sqlite:///{database}").database)
        await storage.open()
        try:
            stored = {row.id for row in await storage.statuses_after(0, 5000)}
            assert len(await storage.history(HistoryQuery("R00", limit=5000))) == 200
        finally:
            await storage.close()
    assert receiver.distinct == stored
    assert len(stored) == 1000
    assert_in_order_per_robot(receiver)


@contextlib.asynccontextmanager
async def _publisher_fleet(port: int, robots: int, each: int) -> AsyncIterator[None]:
    async def one(robot: int) -> None:
        async with raw_publisher(port, f"R{robot:02d}") as publisher:
            await publisher.publish_many(range(robot * 2000, robot * 2000 + each))
            await publisher.acked_ids(each)

    await asyncio.gather(*(one(robot) for robot in range(robots)))
    yield


async def _start_gateway(
    tmp_path: Path, database: Path, broker: Mosquitto, rate: int
) -> tuple[subprocess.Popen[bytes], int]:
    """`spotbox run` forwarding to `broker`; the process and its MQTT port once it listens."""
    mqtt_port = free_port()
    env = os.environ | {"SPOTBOX_FORWARD": broker.url}
    log = (tmp_path / "gw.log").open("ab")
    process = subprocess.Popen(  # noqa: ASYNC220 - the gateway under test, killed and waited on by the caller
        [
            SPOTBOX,
            "run",
            "--http-port",
            "0",
            "--mqtt-port",
            str(mqtt_port),
            "--database-url",
            f"sqlite:///{database}",
            "--forward-prefix",
            PREFIX,
            "--gateway-id",
            "gw1",
            "--forward-rate",
            str(rate),
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    log.close()
    async with asyncio.timeout(20):
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", mqtt_port)
                writer.close()
                return process, mqtt_port
            assert process.poll() is None, (tmp_path / "gw.log").read_text()
            await asyncio.sleep(0.05)


async def test_a_refused_topic_is_reported_and_forwarding_goes_on(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that statuses the upstream ACL refuses (PUBACK 0x87) are counted and reported, and the others arrive."""
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {PREFIX}robot/R00/#\ntopic read #\n")
    with mosquitto_process(tmp_path, extra=f"acl_file {acl}\n") as broker:
        await broker.start()
        async with receiving(broker.port) as receiver:
            await receiver.subscribed.wait()
            # Only statuses: the robots' presence alerts (they go offline as they disconnect) would be refused too.
            box = await make_box(forwarding(tmp_path, broker, forward_alerts=False))
            await publish_fleet(box, robots=2, each=10)  # R00 is allowed upstream, R01 is not
            await receiver.wait_for(10)
            state = await forward_state_when(box, lambda state: state["refused"] == 10 and state["lag_rows"] == 0)
    assert set(receiver.rows) == {"R00"}
    assert state["state"] == "up"
    assert state["forwarded"] == 10
    assert "0x87" in state["last_error"]


async def test_forwarding_over_tls_verifies_the_upstream_certificate(
    make_box: BoxFactory, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    """Test that an mqtts:// target is reached over TLS with --forward-ca, and refused without it (untrusted)."""
    cert, key = certificate
    port = free_port()
    config = tmp_path / "tls.conf"
    config.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\ncertfile {cert}\nkeyfile {key}\n")
    broker = Mosquitto(require_tool("mosquitto"), config, port)
    try:
        await broker.start()
        url = f"mqtts://localhost:{port}"
        trusted = await make_box(forwarding(tmp_path, broker, forward=(url,), forward_ca=cert))
        await publish_fleet(trusted, robots=1, each=3)
        up = await forward_state_when(trusted, lambda state: state["forwarded"] == 3)
        untrusted = await make_box(
            forwarding(tmp_path, broker, forward=(url,), database_url=f"sqlite:///{tmp_path / 'u.db'}")
        )
        down = await forward_state_when(untrusted, lambda state: state["last_error"] is not None)
    finally:
        broker.stop()
    assert up["state"] == "up"
    assert down["state"] != "up"
    assert "certificate" in down["last_error"].lower()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_full_scale_outage_and_kill_lose_nothing(tmp_path: Path) -> None:
    """Test the issue's scenario: 20,000 statuses from 20 robots, the upstream stopped for 30 s in the middle and the
    gateway killed with -9 once: every stored status arrives upstream, in order per robot, each row id once at least."""
    with cloud(tmp_path) as broker:
        await broker.start()
        database = tmp_path / "gw.db"
        async with receiving(broker.port) as receiver:
            await receiver.subscribed.wait()
            gateway, port = await _start_gateway(tmp_path, database, broker, rate=2000)
            try:
                await _publish_range(port, robots=20, first=0, each=250)  # 5,000
                broker.stop()
                outage = asyncio.create_task(asyncio.sleep(30))
                await _publish_range(port, robots=20, first=250, each=250)  # 5,000 more while the uplink is down
                gateway.send_signal(signal.SIGKILL)
                gateway.wait(10)
                gateway, port = await _start_gateway(tmp_path, database, broker, rate=2000)
                await _publish_range(port, robots=20, first=500, each=250)
                await outage
                await broker.start()
                await _publish_range(port, robots=20, first=750, each=250)  # 20,000 in all
                await receiver.wait_for(20_000, timeout_s=120)
            finally:
                gateway.terminate()
                gateway.wait(10)
        storage = open_storage(Settings(database_url=f"sqlite:///{database}").database)
        await storage.open()
        try:
            stored = {row.id for row in await storage.statuses_after(0, 50_000)}
        finally:
            await storage.close()
    assert len(stored) == 20_000
    assert receiver.distinct == stored
    assert_in_order_per_robot(receiver)


async def _publish_range(port: int, robots: int, first: int, each: int) -> None:
    """Each robot publishes statuses `first` to `first + each` (QoS 1, all acknowledged)."""

    async def one(robot: int) -> None:
        async with raw_publisher(port, f"R{robot:02d}") as publisher:
            await publisher.publish_many(range(robot * 2000 + first, robot * 2000 + first + each))
            await publisher.acked_ids(each)

    await asyncio.gather(*(one(robot) for robot in range(robots)))


async def test_alert_changes_are_forwarded_upstream(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that each alert change goes upstream to PREFIXspotbox/alerts/{serial} as {"transition", "alert"}."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="cloud-alerts") as cloud_client:
            await cloud_client.subscribe(f"{PREFIX}spotbox/alerts/#", qos=1)
            box = await make_box(forwarding(tmp_path, broker))
            async with box.http.post(f"{box.base_url}/robots/LOW/status", data=payload(battery_level=5)) as resp:
                assert resp.status == 202
            async with asyncio.timeout(20):
                message = await anext(aiter(cloud_client.messages))
    assert str(message.topic) == f"{PREFIX}spotbox/alerts/LOW"
    assert isinstance(message.payload, bytes)
    change = orjson.loads(message.payload)
    assert (change["transition"]["to"], change["alert"]["rule"]) == ("pending", "battery_low")
