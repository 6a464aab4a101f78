"""Cluster mode: spotbox instances on an MQTT cluster (a Mosquitto the test starts) and one real PostgreSQL.

Publishers talk to the cluster, which acknowledges them; each instance takes its share of
`$share/spotbox/robot/+/status`, commits it, and only then acknowledges it to the cluster. The tests check that
every status the cluster acknowledged is stored exactly once whatever happens to an instance or to the database,
and that any instance's feeds carry the statuses every instance committed, in one order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from spotbox.cluster import client as cluster_client
from spotbox.cluster.ingest import ClusterIngest
from spotbox.errors import ConfigError
from spotbox.keys import CLUSTER, OPS
from spotbox.settings import Settings
from spotbox.status import Delivery, StatusRecord, StoredStatus
from spotbox.storage import Storage, open_storage
from spotbox.storage.postgres import COMMIT_ORDER_LOCK
from spotbox.validation import StatusValidator
from tests.conftest import SPOTBOX, Box, BoxFactory, fresh_postgres_schema
from tests.helpers import FeedReader, mqtt_client, nth_status, open_feed, payload, raw_publisher
from tests.mosquitto import Mosquitto, free_port, mosquitto, mosquitto_process
from tests.test_pg_outage import PrivatePostgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]
__all__ = ["mosquitto"]  # the fixture, used by name


@pytest.fixture
async def shared_database() -> AsyncIterator[str]:
    """One PostgreSQL schema that every instance of the test shares."""
    async with fresh_postgres_schema() as url:
        yield url


def member(database_url: str, broker: Mosquitto, instance: str, **changes: Any) -> Settings:
    """Settings of one cluster instance on port 0 (no MQTT listener: the cluster is the broker)."""
    values: dict[str, Any] = {
        "http_port": 0,
        "database_url": database_url,
        "broker": broker.url,
        "instance_id": instance,
        "batch_wait_ms": 1.0,
        "sse_ping_s": 1.0,
    }
    return Settings(**(values | changes))


def ingest(box: Box) -> ClusterIngest:
    """The instance's cluster link."""
    return box.server.app[CLUSTER]


async def joined(make_box: BoxFactory, settings: Settings) -> Box:
    """An in-process instance, once the cluster has confirmed its shared subscription."""
    box = await make_box(settings)
    async with asyncio.timeout(20):
        await ingest(box).client.wait_subscribed()
    return box


async def publish_fleet(port: int, robots: int, each: int, start: int = 0) -> None:
    """`robots` publishers send `each` QoS 1 statuses (unique timestamps) to the cluster; returns once it acked all."""

    async def one(robot: int) -> None:
        async with raw_publisher(port, f"R{robot:02d}") as publisher:
            numbers = range(robot * 2000 + start, robot * 2000 + start + each)
            await publisher.publish_many(numbers)
            await publisher.acked_ids(each)

    await asyncio.gather(*(one(robot) for robot in range(robots)))


async def stored_count_reaches(storage: Storage, count: int, timeout_s: float = 60) -> None:
    """Return once `count` rows are stored (polled: commits by other instances or processes raise no event here)."""
    async with asyncio.timeout(timeout_s):
        while await storage.count_after(0) < count:  # noqa: ASYNC110 - another process's commits: nothing to await
            await asyncio.sleep(0.05)


async def every_row(storage: Storage) -> list[StoredStatus]:
    """Every stored row, by id."""
    return await storage.statuses_after(0, 1_000_000)


def assert_each_once(rows: list[StoredStatus], expected: int) -> None:
    """Exactly `expected` rows, no status twice (each test status has its own timestamp)."""
    assert len(rows) == expected
    assert len({(row.record.serial_number, row.record.ts) for row in rows}) == expected


async def test_two_instances_share_the_statuses_and_store_each_once(
    make_box: BoxFactory, mosquitto: Mosquitto, shared_database: str
) -> None:
    """Test that 3,000 QoS 1 statuses from 10 publishers are stored once each, both instances took a share, and a
    robot whose one status went to one instance is online on both."""
    a = await joined(make_box, member(shared_database, mosquitto, "a"))
    b = await joined(make_box, member(shared_database, mosquitto, "b"))
    await publish_fleet(mosquitto.port, robots=10, each=300)
    await stored_count_reaches(a.storage, 3000)
    assert_each_once(await every_row(a.storage), 3000)
    async with asyncio.timeout(10):
        while ingest(a).handled + ingest(b).handled < 3000:  # noqa: ASYNC110 - acks follow commits; no event
            await asyncio.sleep(0.01)
    assert ingest(a).handled > 0
    assert ingest(b).handled > 0
    async with a.http.get(f"{a.base_url}/robots") as resp:
        robots = (await resp.json())["items"]
    assert len(robots) == 10, "every instance lists the robots whichever instance stored them"

    async def fleet_stats() -> dict[str, Any]:
        async with b.http.get(f"{b.base_url}/stats") as resp:
            return dict(await resp.json())

    # Each instance saves its counts every 2 s; B's /stats adds A's to its own.
    await until(lambda: _received(fleet_stats(), 3000), timeout_s=15)
    stats = await fleet_stats()
    assert stats["valid"] == 3000
    assert sum(robot["received"] for robot in stats["robots"].values()) == 3000
    # One status goes to one instance; the robot is online on both (presence reads what every instance commits).
    async with mqtt_client(mosquitto.port) as solo:
        await solo.publish("robot/SOLO/status", payload(), qos=1)
    for box in (a, b):
        async with asyncio.timeout(10):
            while box.server.app[OPS].presence.robots.get("SOLO") is None:  # noqa: ASYNC110 - read on a wake-up
                await asyncio.sleep(0.02)
        async with box.http.get(f"{box.base_url}/robots/SOLO") as resp:
            assert (await resp.json())["presence"] == "online"


async def _received(stats: Awaitable[dict[str, Any]], count: int) -> bool:
    received: int = (await stats)["received"]
    return received == count


async def test_an_sse_feed_carries_every_instances_rows_in_order_and_resumes_elsewhere(
    make_box: BoxFactory, mosquitto: Mosquitto, shared_database: str
) -> None:
    """Test that a feed on A gets B's rows in id order without gaps, and Last-Event-ID on B continues it."""
    a = await joined(make_box, member(shared_database, mosquitto, "a"))
    b = await joined(make_box, member(shared_database, mosquitto, "b"))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with open_feed(a.http, f"{a.base_url}/feed") as feed:
        await publish_fleet(mosquitto.port, robots=5, each=100)
        async with asyncio.timeout(30):
            seen = [int(event.id) for event in [await feed.next() for _ in range(500)] if event.id is not None]
    first = [row.id for row in await every_row(a.storage)]
    assert seen == first, "A's feed is every row, in id (commit) order, none skipped or repeated"
    assert b.server.app[CLUSTER].pipeline.stats.stored > 0, "B committed some of them"
    assert a.server.app[CLUSTER].pipeline.stats.stored > 0
    resume_from = seen[199]
    headers = {"Last-Event-ID": str(resume_from)}
    async with b.http.get(f"{b.base_url}/feed", headers=headers, timeout=timeout) as response:
        assert response.status == 200
        resumed = FeedReader(response)
        await publish_fleet(mosquitto.port, robots=5, each=100, start=500)  # more while resuming
        async with asyncio.timeout(30):
            rest = [int((await resumed.next()).id or 0) for _ in range(800)]
    assert rest == [row.id for row in await every_row(b.storage) if row.id > resume_from]


async def test_a_rejected_status_is_acknowledged_and_reported_on_the_cluster(
    make_box: BoxFactory, mosquitto: Mosquitto, shared_database: str
) -> None:
    """Test that an invalid status is not stored, is acknowledged, and its report reaches spotbox/rejected/{serial}."""
    a = await joined(make_box, member(shared_database, mosquitto, "a"))
    async with mqtt_client(mosquitto.port, "5") as watcher:
        await watcher.subscribe("spotbox/rejected/+", qos=1)
        await watcher.publish("robot/R9/status", payload(battery_level=150), qos=1)
        async with asyncio.timeout(15):
            message = await anext(aiter(watcher.messages))
    assert isinstance(message.payload, bytes)
    report = orjson.loads(message.payload)
    assert str(message.topic) == "spotbox/rejected/R9"
    assert report["topic"] == "robot/R9/status"
    assert report["errors"] == ["battery_level: 150 is greater than the maximum of 100"]
    assert await a.storage.count_after(0) == 0
    async with asyncio.timeout(10):
        while ingest(a).handled < 1:  # noqa: ASYNC110 - the ack follows the report; no event
            await asyncio.sleep(0.01)
    async with a.http.get(f"{a.base_url}/mqtt") as resp:
        assert resp.status == 404, "no MQTT over WebSocket without the embedded broker"
        assert set(await resp.json()) == {"error", "detail"}


async def test_a_redelivered_status_without_timestamp_is_stored_once_after_a_restart(
    make_box: BoxFactory, mosquitto: Mosquitto, shared_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a status without a timestamp, committed but never acknowledged, is stored once when redelivered."""

    def lose_the_ack(connection: Any) -> None:
        # The fault: the PUBACK never reaches the cluster (the link dies as it is written).
        if connection.unacked and connection.unacked[0].acked:
            connection.writer.transport.abort()

    monkeypatch.setattr(cluster_client._Connection, "release_acks", lose_the_ack)
    first = await joined(make_box, member(shared_database, mosquitto, "dup"))
    async with mqtt_client(mosquitto.port, "5") as robot:
        await robot.publish("robot/R1/status", payload(timestamp=...), qos=1)
    await stored_count_reaches(first.storage, 1)
    await first.http.close()
    await first.server.close()
    monkeypatch.undo()
    second = await joined(make_box, member(shared_database, mosquitto, "dup"))  # same session, nothing in memory
    async with asyncio.timeout(20):
        while ingest(second).handled < 1:  # noqa: ASYNC110 - the redelivery's handling raises no event
            await asyncio.sleep(0.02)
    rows = await every_row(second.storage)
    assert len(rows) == 1, "the redelivery (DUP) got the first receive time, so the same key"


async def test_ready_names_the_cluster_while_it_is_unreachable(
    make_box: BoxFactory, tmp_path: Path, shared_database: str
) -> None:
    """Test that /ready is 503 naming the cluster until its broker comes up, then 200 (reconnect with backoff)."""
    with mosquitto_process(tmp_path) as broker:  # not started yet: nothing listens on its port
        port = broker.port
        box = await make_box(member(shared_database, broker, "late"))
        async with box.http.get(f"{box.base_url}/ready") as resp:
            assert resp.status == 503
            detail = (await resp.json())["detail"]
        assert detail["cluster"].startswith(f"unreachable: mqtt://127.0.0.1:{port}")
        assert "broker" not in detail
        async with box.http.get(f"{box.base_url}/metrics") as resp:
            assert "spotbox_cluster_up 0.0" in await resp.text()
        await broker.start()
        async with asyncio.timeout(20):
            await ingest(box).client.wait_subscribed()
        async with box.http.get(f"{box.base_url}/ready") as resp:
            assert resp.status == 200, await resp.text()
        async with box.http.get(f"{box.base_url}/metrics") as resp:
            assert "spotbox_cluster_up 1.0" in await resp.text()


def test_cluster_mode_refuses_sqlite() -> None:
    """Test that --broker with a SQLite database is a one-line error naming --broker and PostgreSQL."""
    with pytest.raises(ConfigError) as caught:
        Settings(broker="mqtt://127.0.0.1:1883")
    assert caught.value.option == "--broker"
    assert "PostgreSQL" in str(caught.value)
    assert "\n" not in str(caught.value)


async def _start_instance(tmp_path: Path, database_url: str, broker: Mosquitto, instance: str) -> tuple[Any, int]:
    """`spotbox run --broker` as its own process; the process and its HTTP port once /ready says 200."""
    http_port = free_port()
    log = (tmp_path / f"{instance}.log").open("ab")
    process = subprocess.Popen(  # noqa: ASYNC220 - the instance under test, killed and waited on by the test
        [SPOTBOX, "run", "--http-port", str(http_port), "--database-url", database_url, "--batch-wait-ms", "1"],
        env=os.environ | {"SPOTBOX_BROKER": broker.url, "SPOTBOX_INSTANCE_ID": instance},
        stdout=log,
        stderr=log,
    )
    log.close()
    async with aiohttp.ClientSession() as http, asyncio.timeout(30):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{http_port}/ready") as resp:
                    if resp.status == 200:
                        return process, http_port
            assert process.poll() is None, (tmp_path / f"{instance}.log").read_text()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def opened(database_url: str) -> AsyncIterator[Storage]:
    """The shared database, read by the test itself."""
    storage = open_storage(Settings(database_url=database_url).database)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


async def kill_one_mid_load(tmp_path: Path, database_url: str, broker: Mosquitto, robots: int, each: int) -> None:
    """Two `spotbox run --broker` processes; A is killed with -9 mid-load and restarted with the same instance id."""
    total = robots * each
    a, _ = await _start_instance(tmp_path, database_url, broker, "a")
    b, _ = await _start_instance(tmp_path, database_url, broker, "b")
    try:
        async with opened(database_url) as storage:
            load = asyncio.create_task(publish_fleet(broker.port, robots=robots, each=each))
            await stored_count_reaches(storage, total // 5)
            a.send_signal(signal.SIGKILL)
            a.wait(10)
            await load  # the cluster acknowledged every status to its publisher
            a, _ = await _start_instance(tmp_path, database_url, broker, "a")
            await stored_count_reaches(storage, total, timeout_s=120)
            await asyncio.sleep(0.5)  # a duplicate would be committed right after the last row
            assert_each_once(await every_row(storage), total)
    finally:
        for process in (a, b):
            process.terminate()
            process.wait(10)


@pytest.mark.slow  # two spotbox processes and a Mosquitto; the full-scale run below kills one too
async def test_kill_9_of_one_instance_loses_and_repeats_nothing(tmp_path: Path, shared_database: str) -> None:
    """Test that kill -9 of one instance mid-load and a restart under the same id store every status exactly once."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        await kill_one_mid_load(tmp_path, shared_database, broker, robots=10, each=300)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_full_scale_20000_statuses_with_a_kill(tmp_path: Path, shared_database: str) -> None:
    """Test the issue's scale: 20,000 statuses from 20 publishers, one instance killed -9 and restarted: each once."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        await kill_one_mid_load(tmp_path, shared_database, broker, robots=20, each=1000)


async def until(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30) -> None:
    """Return once `condition` holds (state set by background loops: polled)."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.02)


@pytest.mark.timeout(180)
async def test_postgres_restart_mid_load_both_instances_hold_acks_and_catch_up(
    make_box: BoxFactory, mosquitto: Mosquitto, private_postgres: PrivatePostgres
) -> None:
    """Test that with PostgreSQL down both instances hold their acks and are not ready, then store every status once."""
    a = await joined(make_box, member(private_postgres.url, mosquitto, "a"))
    b = await joined(make_box, member(private_postgres.url, mosquitto, "b"))
    await publish_fleet(mosquitto.port, robots=5, each=200)
    await stored_count_reaches(a.storage, 1000)
    await private_postgres.stop("immediate")
    await publish_fleet(mosquitto.port, robots=5, each=200, start=200)  # the cluster acknowledges these
    boxes = (a, b)
    await until(lambda: not any(ingest(box).pipeline.storage_available for box in boxes))
    for box in boxes:
        async with box.http.get(f"{box.base_url}/ready") as resp:
            assert resp.status == 503
            assert (await resp.json())["detail"]["storage"].startswith("unavailable")
    held = sum(ingest(box).handled for box in boxes)
    assert held < 2000, "statuses were acknowledged to the cluster while the database was down"
    await private_postgres.start()
    await until(lambda: sum(ingest(box).handled for box in boxes) >= 2000, timeout_s=90)
    assert_each_once(await every_row(a.storage), 2000)


class _HeldConnection:
    """A pool connection whose transaction stops after its INSERT (its last fetch): ids drawn, not yet committed."""

    def __init__(self, conn: Any, inserted: asyncio.Event, release: asyncio.Event) -> None:
        self._conn = conn
        self._inserted = inserted
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetch(self, *args: Any) -> Any:
        rows = await self._conn.fetch(*args)
        if not str(args[0]).lstrip().startswith("INSERT"):
            return rows  # the lookup of the resends first
        self._inserted.set()
        await self._release.wait()
        return rows


def checked(n: int) -> StatusRecord:
    """The record of `nth_status(n)` of robot R1, validated now."""
    verdict = StatusValidator(Settings().schema_path).check("R1", nth_status(n), datetime.now(UTC))
    assert isinstance(verdict, StatusRecord)
    return verdict


def resend(record: StatusRecord, packet_id: int) -> StatusRecord:
    """`record` as a resend (DUP) of an MQTT delivery, which storage looks up before inserting."""
    record.delivery_key = Delivery("robot-1", packet_id, resend=True).key(record.payload_hash)
    record.resend = True
    return record


async def test_a_batch_draws_its_ids_only_under_the_commit_order_lock(shared_database: str) -> None:
    """Test that a batch written in one statement waits for the commit-order lock before drawing any id: while
    another transaction holds the lock, the batch is not stored and the id sequence has not moved."""
    holder = await asyncpg.connect(shared_database, timeout=10)
    try:
        async with opened(shared_database) as storage:
            await storage.write_batch([checked(0)])
            before = await holder.fetchval("SELECT last_value FROM status_id_seq")
            holding = holder.transaction()
            await holding.start()
            await holder.execute("SELECT pg_advisory_xact_lock($1)", COMMIT_ORDER_LOCK)
            writing = asyncio.create_task(storage.write_batch([checked(1)]))
            done, _ = await asyncio.wait({writing}, timeout=0.5)
            assert not done, "the batch committed while another transaction held the commit-order lock"
            assert await holder.fetchval("SELECT last_value FROM status_id_seq") == before, (
                "ids were drawn before the lock: a commit of another instance could land below them"
            )
            await holding.commit()
            async with asyncio.timeout(10):
                [row_id] = await writing
            assert row_id == before + 1
    finally:
        await holder.close()


async def test_row_ids_are_in_commit_order_across_writers(
    shared_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a second instance's batch waits for one in flight (a batch with a resend, written in a transaction
    of several statements), so no row commits below an id already visible."""
    async with opened(shared_database) as a, opened(shared_database) as b:
        inserted, release = asyncio.Event(), asyncio.Event()
        acquire = a._acquire  # type: ignore[attr-defined]

        @contextlib.asynccontextmanager
        async def held() -> AsyncIterator[_HeldConnection]:
            async with acquire() as conn:
                yield _HeldConnection(conn, inserted, release)

        monkeypatch.setattr(a, "_acquire", held)
        first = asyncio.create_task(a.write_batch([resend(checked(1), 7)]))
        async with asyncio.timeout(10):
            await inserted.wait()
        second = asyncio.create_task(b.write_batch([checked(2)]))
        done, _ = await asyncio.wait({second}, timeout=0.5)
        assert not done, "B committed while A's ids were drawn and not committed: a reader could skip A's row"
        assert await b.rows_after(None, 0, 10) == []
        release.set()
        [first_id], [second_id] = await first, await second
    assert first_id is not None
    assert second_id is not None
    assert first_id < second_id


def compose_defaults(environment: dict[str, str]) -> dict[str, str]:
    """What compose makes of each ${NAME:-default} when NAME is unset."""
    return {key: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value) for key, value in environment.items()}


def test_compose_example_runs_two_instances_on_emqx_behind_a_checked_balancer() -> None:
    """Test that examples/cluster wires both instances to EMQX and one PostgreSQL, uniquely named, behind /ready."""
    root = Path(__file__).parent.parent
    compose = yaml.safe_load((root / "examples/cluster/docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    instances = [services["spotbox-a"], services["spotbox-b"]]
    postgres = compose_defaults(services["postgres"]["environment"])
    names = set()
    for instance in instances:
        env = compose_defaults(instance["environment"])
        settings = Settings(
            database_url=env["DATABASE_URL"], broker=env["SPOTBOX_BROKER"], instance_id=env["SPOTBOX_INSTANCE_ID"]
        )
        assert settings.database_url == (
            f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/"
            f"{postgres['POSTGRES_DB']}"
        )
        assert settings.broker == "mqtt://emqx:1883"
        names.add(settings.instance_id)
        assert (
            root / "examples/cluster" / instance["build"]["context"] / "Dockerfile"
        ).resolve() == root / "Dockerfile"
        assert "--users" not in instance["command"]
    assert len(names) == 2, "each instance needs its own --instance-id (its session on the cluster)"
    assert "1883:1883" in services["emqx"]["ports"]
    haproxy = (root / "examples/cluster/haproxy.cfg").read_text()
    assert "option httpchk GET /ready" in haproxy
    assert {line.split()[2] for line in haproxy.splitlines() if line.strip().startswith("server ")} == {
        "spotbox-a:8000",
        "spotbox-b:8000",
    }
