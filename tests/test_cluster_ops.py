"""Presence and alerts across spotbox instances sharing one PostgreSQL database (issue 15).

Two embedded-broker gateways in the test process, on one real PostgreSQL schema: a robot publishing through one
is seen by the other, and an alert changes state once whichever instances saw its robot's statuses, with one
webhook call per change (a real HTTP receiver) and one `alert` event per change on each instance's feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from spotbox.cluster.ops import SharedOps
from spotbox.errors import StorageError
from spotbox.keys import OPS, SHARED_OPS
from spotbox.ops.alerts import Alert, Transition
from spotbox.ops.store import load_unfinished
from spotbox.settings import Settings
from spotbox.storage import Storage
from tests.conftest import Box, BoxFactory, fresh_postgres_schema
from tests.helpers import FeedReader, mqtt_client, open_feed, payload, stamp

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]

RULES = """
[[rule]]
name = "battery_low"
kind = "threshold"
field = "battery_level"
below = 20
clear = 25
for_s = 0.2

[[rule]]
name = "rejections_high"
kind = "rejections"
ratio = 0.3
window_s = 60
min_seen = 4

[[rule]]
name = "not_reporting"
kind = "presence"
states = ["offline"]
severity = "critical"
"""


@pytest.fixture
async def shared_database() -> AsyncIterator[str]:
    """One PostgreSQL schema both instances of the test share (asked for before make_box: dropped after the
    instances stop)."""
    async with fresh_postgres_schema() as url:
        yield url


@pytest.fixture
async def other_database() -> AsyncIterator[str]:
    """A second schema of the same database, for a second deployment (dropped after the instances stop)."""
    async with fresh_postgres_schema() as url:
        yield url


@contextlib.asynccontextmanager
async def fresh_admin(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to the shared database."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


@dataclasses.dataclass
class Hook:
    """A real HTTP receiver of alert webhooks: every document POSTed to it, in order."""

    url: str
    received: list[dict[str, Any]]


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    received: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Hook(f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received)
    finally:
        await runner.cleanup()


def gateway(database_url: str, tmp_path: Path, **changes: Any) -> Settings:
    """An embedded-broker gateway on port 0 on the shared database, with the test's rules and a quick tick."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    values: dict[str, Any] = {
        "http_port": 0,
        "mqtt_port": 0,
        "database_url": database_url,
        "batch_wait_ms": 1.0,
        "sse_ping_s": 1.0,
        "alerts_path": rules,
        "ops_tick_s": 0.05,
    }
    return Settings(**(values | changes))


def shared(box: Box) -> SharedOps:
    """The instance's cross-instance operations."""
    return box.server.app[SHARED_OPS]


async def post(box: Box, serial: str, n: int, **changes: Any) -> None:
    """POST one status of `serial` to `box` over HTTP (committed when it answers)."""
    url = f"{box.base_url}/robots/{serial}/status"
    async with box.http.post(url, data=payload(timestamp=stamp(n), **changes)) as resp:
        assert resp.status == 202, await resp.text()


async def robot(box: Box, serial: str) -> dict[str, Any]:
    async with box.http.get(f"{box.base_url}/robots/{serial}") as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
    return body


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10) -> None:
    """Return once `condition` holds (polled: another instance's commits raise no event in this one)."""
    async with asyncio.timeout(timeout_s):
        while True:
            outcome = condition()
            if outcome is True or (not isinstance(outcome, bool) and await outcome):
                return
            await asyncio.sleep(0.02)


async def presence_is(box: Box, serial: str, state: str) -> bool:
    presence: str = (await robot(box, serial))["presence"]
    return presence == state


async def next_event(feed: FeedReader, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            event = await feed.next()
            if event.event == kind:
                data: dict[str, Any] = event.json()
                return data


async def test_a_robot_on_b_is_online_stale_and_offline_on_a(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that a robot posting only to B is online on A (/robots, /robots/{serial}, A's fleet feed), then stale
    and offline on A's clock after its silence."""
    settings = gateway(shared_database, tmp_path, stale_after_s=0.3, offline_after_s=0.6)
    a = await make_box(settings)
    b = await make_box(settings)
    async with open_feed(a.http, f"{a.base_url}/feed", skip=("status", "alert")) as feed:
        await post(b, "ONB", 0)
        online = await next_event(feed, "presence")
        assert (online["serial_number"], online["presence"]) == ("ONB", "online")
        async with a.http.get(f"{a.base_url}/robots") as resp:
            [item] = (await resp.json())["items"]
        assert (item["serial_number"], item["presence"]) in {("ONB", "online"), ("ONB", "stale")}
        assert [(await next_event(feed, "presence"))["presence"] for _ in range(2)] == ["stale", "offline"]
    assert (await robot(a, "ONB"))["presence"] == "offline"


async def test_a_connection_end_on_b_is_offline_on_a_and_a_robot_that_moved_does_not_flap(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test over real MQTT: a robot leaving B is offline on A at once (not after --offline-after); a robot that
    moved from B to A stays online on both when its old connection to B ends."""
    settings = gateway(shared_database, tmp_path, offline_after_s=600.0, alerts_path=None)
    a = await make_box(settings)
    b = await make_box(settings)
    async with mqtt_client(b.mqtt_port) as on_b:
        await on_b.publish("robot/LEAVES/status", payload(), qos=1)
        await until(lambda: presence_is(a, "LEAVES", "online"))
    await until(lambda: presence_is(a, "LEAVES", "offline"))

    async with contextlib.AsyncExitStack() as stack:
        old = await stack.enter_async_context(mqtt_client(b.mqtt_port))
        await old.publish("robot/MOVES/status", payload(timestamp=stamp(1)), qos=1)
        await until(lambda: presence_is(a, "MOVES", "online"))
        async with mqtt_client(a.mqtt_port) as new:
            await new.publish("robot/MOVES/status", payload(timestamp=stamp(2)), qos=1)
            latest = a.server.app[OPS].presence.robots["MOVES"].last_seen
            # B has read A's newer status: its old connection no longer carries the robot's latest status.
            await until(lambda: b.server.app[OPS].presence.robots["MOVES"].last_seen == latest)
            await stack.aclose()
            await until(lambda: not b.broker.connections)
            await shared(a).catch_up()
            assert await presence_is(b, "MOVES", "online")
            assert await presence_is(a, "MOVES", "online")


async def test_an_alert_changes_state_once_across_instances(
    shared_database: str, hook: Hook, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that low batteries posted to both instances open one alert: one row, one webhook call per change,
    one `alert` event per change on each instance's robot feed; two acknowledgements at once make one; a status
    on the other instance clears it once."""
    settings = gateway(shared_database, tmp_path, alert_webhook=hook.url)
    a = await make_box(settings)
    b = await make_box(settings)
    assert shared(a).evaluator, "the first instance evaluates"
    assert not shared(b).evaluator
    feeds = [f"{box.base_url}/robots/LOW/feed" for box in (a, b)]
    async with (
        open_feed(a.http, feeds[0], skip=("status", "presence")) as feed_a,
        open_feed(b.http, feeds[1], skip=("status", "presence")) as feed_b,
    ):
        for n in range(6):
            await post((a, b)[n % 2], "LOW", n, battery_level=10 + n)
        for feed in (feed_a, feed_b):
            assert [(await next_event(feed, "alert"))["state"] for _ in range(2)] == ["pending", "active"]
        async with a.http.get(f"{a.base_url}/alerts", params={"state": "open"}) as resp:
            [alert] = (await resp.json())["items"]
        acks = await asyncio.gather(*(box.http.post(f"{box.base_url}/alerts/{alert['id']}/ack") for box in (a, b)))
        for resp in acks:
            assert resp.status == 200
            assert (await resp.json())["acknowledged"] is True
            resp.release()
        engines = [box.server.app[OPS].alerts for box in (a, b)]
        await until(lambda: all(engine.open[alert["id"]].acknowledged for engine in engines))
        await post(b, "LOW", 10, battery_level=90)
        for feed in (feed_a, feed_b):
            states = [(await next_event(feed, "alert")) for _ in range(2)]
            assert [(s["state"], s["acknowledged"]) for s in states] == [("active", True), ("cleared", True)]
    await until(lambda: len(hook.received) >= 4)
    for box in (a, b):
        await box.server.app[OPS].writer.flushed()
    await asyncio.sleep(0.2)  # a duplicate call would come now
    # The acknowledgement's call comes from the instance that made it, so it may pass the clearing's.
    assert sorted((d["transition"]["from"] or "", d["transition"]["to"]) for d in hook.received) == [
        ("", "pending"),
        ("active", "cleared"),
        ("pending", "active"),
        ("unacknowledged", "acknowledged"),
    ]
    assert {d["alert"]["id"] for d in hook.received} == {alert["id"]}
    rows = await a.storage.query("SELECT id, state FROM alert", [])
    assert [tuple(row) for row in rows] == [(alert["id"], "cleared")]
    async with b.http.get(f"{b.base_url}/alerts/{alert['id']}") as resp:
        shown = await resp.json()
    assert [t["to"] for t in shown["history"]] == ["pending", "active", "acknowledged", "cleared"]


async def test_offline_is_detected_once_and_the_other_instance_takes_over(
    shared_database: str, hook: Hook, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that a silent robot, offline on both instances' timers, opens one alert (one webhook call per change);
    when the evaluating instance stops, the other takes over and clears it on the robot's next status."""
    settings = gateway(shared_database, tmp_path, alert_webhook=hook.url, stale_after_s=0.1, offline_after_s=0.2)
    a = await make_box(settings)
    b = await make_box(settings)
    await post(b, "QUIET", 0)
    await until(lambda: len(hook.received) >= 2)
    await until(lambda: bool(b.server.app[OPS].alerts.current))
    await asyncio.sleep(0.3)  # both timers have run past the offline time several times
    assert [(d["transition"]["from"], d["transition"]["to"]) for d in hook.received] == [
        (None, "pending"),
        ("pending", "active"),
    ]
    [(alert_id,)] = await b.storage.query("SELECT id FROM alert WHERE state <> 'cleared'", [])
    await a.http.close()
    await a.server.close()
    await until(lambda: shared(b).evaluator)
    await post(b, "QUIET", 1)
    await until(lambda: len(hook.received) >= 3)
    assert (hook.received[2]["transition"]["to"], hook.received[2]["alert"]["id"]) == ("cleared", alert_id)


async def test_a_robot_registered_on_a_is_registered_on_b(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that the registry is one: a robot registered on A is listed as registered by B, and removed on B is
    gone from A."""
    settings = gateway(shared_database, tmp_path)
    a = await make_box(settings)
    b = await make_box(settings)
    async with a.http.post(f"{a.base_url}/robots", json={"serial_number": "REG1", "site": "north"}) as resp:
        assert resp.status == 201, await resp.text()
    await until(lambda: "REG1" in b.server.app[OPS].registry)
    assert (await robot(b, "REG1"))["site"] == "north"
    async with b.http.delete(f"{b.base_url}/robots/REG1") as resp:
        assert resp.status == 204
    await until(lambda: "REG1" not in a.server.app[OPS].registry)


async def test_rejections_on_b_and_statuses_on_a_open_one_rejection_alert(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that the rejection rule counts every instance's statuses and rejections: valid statuses on A and
    refused ones on B (40% of the robot's statuses) open one alert, where neither instance's share would."""
    settings = gateway(shared_database, tmp_path)
    a = await make_box(settings)
    b = await make_box(settings)
    for n in range(3):
        await post(a, "MIXED", n)
    for _ in range(2):
        async with b.http.post(f"{b.base_url}/robots/MIXED/status", data=payload(battery_level=150)) as resp:
            assert resp.status == 422
    await until(lambda: any(alert.rule == "rejections_high" for alert in b.server.app[OPS].alerts.current.values()))
    rows = await a.storage.query("SELECT rule, serial_number, value FROM alert", [])
    assert [tuple(row) for row in rows] == [("rejections_high", "MIXED", 0.4)]


async def test_an_evaluator_whose_connection_dies_hands_over_to_the_other(
    shared_database: str, hook: Hook, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that when the server ends the evaluating instance's lock connection (as it does for a crashed one),
    the other instance evaluates, the first stops, and an alert still opens once."""
    settings = gateway(shared_database, tmp_path, alert_webhook=hook.url)
    a = await make_box(settings)
    b = await make_box(settings)
    # The connection whose end is, seen from the server, the crash of its instance.
    lock_conn = shared(a)._lock_conn
    assert lock_conn is not None
    async with fresh_admin(shared_database) as admin:
        await admin.execute("SELECT pg_terminate_backend($1)", lock_conn.get_server_pid())
    await until(lambda: shared(b).evaluator and not shared(a).evaluator)
    for n in range(4):
        await post((a, b)[n % 2], "HANDED", n, battery_level=5)
    await until(lambda: len(hook.received) >= 2)
    await asyncio.sleep(0.2)  # a second evaluator's calls would come now
    assert [(d["transition"]["from"], d["transition"]["to"]) for d in hook.received] == [
        (None, "pending"),
        ("pending", "active"),
    ]
    assert not shared(a).evaluator


@contextlib.asynccontextmanager
async def transitions_held(box: Box) -> AsyncIterator[None]:
    """Keep `box` from reading the alert changes other instances made (as a slow poll would) until the block ends;
    it reads their statuses until its next read of alert changes."""
    ops = shared(box)
    read, gate, entered = ops._read_transitions, asyncio.Event(), asyncio.Event()

    async def held() -> None:
        entered.set()
        await gate.wait()
        await read()

    ops._read_transitions = held  # type: ignore[method-assign]
    try:
        await until(entered.is_set)  # the read started before now (if any) is over
        yield
    finally:
        gate.set()
        ops._read_transitions = read  # type: ignore[method-assign]


async def stored_alerts(box: Box, serial: str) -> list[tuple[str, str, bool]]:
    """(id, state, acknowledged) of the robot's stored alerts, oldest first."""
    sql = "SELECT id, state, acknowledged FROM alert WHERE serial_number = $1 ORDER BY created_at"
    return [(row[0], row[1], bool(row[2])) for row in await box.storage.query(sql, [serial])]


async def test_acknowledging_on_an_instance_behind_the_evaluator_keeps_the_stored_state(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that acknowledging, on an instance that has not yet read the evaluator's clearing, an alert the
    evaluator cleared stores the acknowledgement and leaves the alert cleared, also when the evaluator has opened
    a new alert of that rule and robot since; the instance's later alert writes are stored."""
    settings = gateway(shared_database, tmp_path)
    a = await make_box(settings)
    b = await make_box(settings)
    for serial in ("REOPENS", "STAYS"):
        await post(a, serial, 0, battery_level=5)
    await until(lambda: sum(alert.state == "active" for alert in b.server.app[OPS].alerts.open.values()) == 2)
    [(reopens, _, _)] = await stored_alerts(a, "REOPENS")
    [(stays, _, _)] = await stored_alerts(a, "STAYS")
    async with transitions_held(b):
        await post(a, "REOPENS", 1, battery_level=90)
        await post(a, "STAYS", 1, battery_level=90)
        await post(a, "REOPENS", 2, battery_level=5)
        await a.server.app[OPS].writer.flushed()
        assert [state for _, state, _ in await stored_alerts(a, "REOPENS")] in (
            ["cleared", "pending"],
            ["cleared", "active"],
        )
        for alert_id in (stays, reopens):
            async with b.http.post(f"{b.base_url}/alerts/{alert_id}/ack") as resp:
                assert resp.status == 200, await resp.text()
        sql = "SELECT count(*) FROM alert_transition WHERE alert_id = $1 AND to_state = 'acknowledged'"
        await until(lambda: _one(b, sql, reopens), timeout_s=5)
    assert await stored_alerts(a, "STAYS") == [(stays, "cleared", True)]
    [first, second] = await stored_alerts(a, "REOPENS")
    assert first == (reopens, "cleared", True)
    assert second[1:] in {("pending", False), ("active", False)}


async def _one(box: Box, sql: str, *params: Any) -> bool:
    ((count,),) = await box.storage.query(sql, list(params))
    return bool(count == 1)


async def test_a_change_the_database_refuses_is_dropped_and_later_changes_are_written(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that an alert change breaking the one-in-progress index (two instances at odds for a moment) is
    dropped, not retried forever, and the writer goes on with the next changes."""
    box = await make_box(gateway(shared_database, tmp_path))
    ops = box.server.app[OPS]
    now = ops.clock()
    stale = Alert("stale", "battery_low", "ODDS", "warning", "cleared", now, now, "old", cleared_at=now)
    for alert in (stale, dataclasses.replace(stale, id="current", state="active", cleared_at=None)):
        ops.writer.add(alert, Transition(now, None, alert.state))
    await ops.writer.flushed()
    ops.writer.add(dataclasses.replace(stale, state="active", cleared_at=None), Transition(now, "cleared", "active"))
    await ops.writer.flushed()
    assert ops.alerts.acknowledge(dataclasses.replace(stale, id="current", state="active"), None, now) is not None
    await until(lambda: _one(box, "SELECT count(*) FROM alert_transition WHERE to_state = 'acknowledged'"), 5)
    assert await stored_alerts(box, "ODDS") == [("stale", "cleared", False), ("current", "active", True)]


async def test_an_alert_the_database_did_not_keep_is_gone_from_the_feeds_and_mqtt(
    shared_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that when two instances open an alert of one rule and robot at once (both believing for a moment that
    they evaluate) and the database keeps the other's, the feed says this instance's is gone (not open) and the
    robot's retained MQTT message no longer lists it."""
    settings = gateway(shared_database, tmp_path)
    a = await make_box(settings)
    b = await make_box(settings)
    now = b.server.app[OPS].clock()
    theirs = Alert("theirs", "battery_low", "TWICE", "warning", "pending", now, now, "battery_level 4 is below 20")
    async with (
        open_feed(a.http, f"{a.base_url}/robots/TWICE/feed", skip=("status", "presence")) as feed,
        transitions_held(a),
    ):
        b.server.app[OPS].writer.add(theirs, Transition(now, None, "pending"))
        await b.server.app[OPS].writer.flushed()
        await post(a, "TWICE", 0, battery_level=5)
        ours = await next_event(feed, "alert")
        assert (ours["state"], ours["open"]) == ("pending", True)
        gone = await next_event(feed, "alert")
        while gone["open"]:  # it may have become active meanwhile
            gone = await next_event(feed, "alert")
        assert gone["id"] == ours["id"]
        async with mqtt_client(a.mqtt_port) as watcher:
            await watcher.subscribe("spotbox/alerts/TWICE", qos=1)
            async with asyncio.timeout(10):
                async for message in watcher.messages:
                    if orjson.loads(bytes(message.payload)) == []:
                        break
    assert [alert_id for alert_id, _, _ in await stored_alerts(a, "TWICE")] == ["theirs"]


async def test_an_instance_starts_when_the_alerts_cannot_be_read_and_evaluates_once_they_can(
    shared_database: str, make_box: BoxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a database error while taking up the stored alerts at start does not stop the instance starting:
    it evaluates once a retry reads them."""
    failures = [StorageError("PostgreSQL read failed: the connection was closed")]

    async def flaky(storage: Storage) -> list[Alert]:
        if failures:
            raise failures.pop()
        return await load_unfinished(storage)

    monkeypatch.setattr("spotbox.cluster.ops.load_unfinished", flaky)
    box = await make_box(gateway(shared_database, tmp_path))
    await until(lambda: shared(box).evaluator)
    assert not failures


async def test_statuses_and_rejections_committed_while_an_instance_takes_over_are_evaluated(
    shared_database: str, make_box: BoxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that statuses and rejections committed while an instance takes over the evaluation (reading the stored
    alerts) are evaluated once it has: they open their alerts without a further status."""
    settings = gateway(shared_database, tmp_path)
    a = await make_box(settings)
    b = await make_box(settings)
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(storage: Storage) -> list[Alert]:
        entered.set()
        await gate.wait()
        return await load_unfinished(storage)

    monkeypatch.setattr("spotbox.cluster.ops.load_unfinished", slow)
    await a.http.close()
    await a.server.close()
    await asyncio.wait_for(entered.wait(), 10)
    for n in range(3):
        await post(b, "TAKEN", n, battery_level=5)
    for _ in range(2):
        async with b.http.post(f"{b.base_url}/robots/TAKEN/status", data=payload(battery_level=150)) as resp:
            assert resp.status == 422
    await until(lambda: _count_is(b, "SELECT count(*) FROM rejection", 2))
    gate.set()
    await until(lambda: shared(b).evaluator)
    engine = b.server.app[OPS].alerts
    await until(lambda: {rule for rule, _ in engine.current} == {"battery_low", "rejections_high"})


async def _count_is(box: Box, sql: str, expected: int) -> bool:
    ((count,),) = await box.storage.query(sql, [])
    return bool(count == expected)


async def test_deployments_in_two_schemas_of_one_database_each_evaluate_their_alerts(
    shared_database: str, other_database: str, make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that two deployments in two schemas of one database (search_path) each have an evaluator and each
    open their robots' alerts: PostgreSQL's advisory locks are the whole database's, the evaluator's is keyed by
    the schema too."""
    first = await make_box(gateway(shared_database, tmp_path))
    second = await make_box(gateway(other_database, tmp_path))
    await until(lambda: shared(first).evaluator and shared(second).evaluator)
    await post(first, "LOW-1", 0, battery_level=5)
    await post(second, "LOW-2", 0, battery_level=5)

    async def opened(box: Box, serial: str) -> bool:
        return bool(await stored_alerts(box, serial))

    await until(lambda: opened(first, "LOW-1"))
    await until(lambda: opened(second, "LOW-2"))
