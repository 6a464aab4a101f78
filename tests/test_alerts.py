"""Alerts: rules, the pending/active/cleared x acknowledged lifecycle, and every place an alert shows up."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from spotbox.errors import ConfigError
from spotbox.keys import OPS
from spotbox.ops.alerts import Alert, AlertEngine, Transition
from spotbox.ops.rules import DEFAULT_RULES, load_rules
from spotbox.ops.store import WRITE_BATCH_MAX, AlertWriter
from spotbox.settings import DatabaseURL, Settings
from spotbox.status import StatusRecord, StoredStatus
from spotbox.storage import open_storage
from spotbox.users import Users
from tests.conftest import Box, BoxFactory
from tests.helpers import known_user, mqtt_client, open_feed, payload
from tests.test_presence import Clock

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "alerts.toml"


def row(serial: str, battery: int, clock: Clock, n: int = 1) -> StoredStatus:
    """A committed status of `serial` received now on `clock`."""
    now = clock.now
    record = StatusRecord(serial, now, now, battery, "DISCHARGING", "IDLE", None, 1.0, 2.0, 3.0, b"{}", b"h")
    return StoredStatus(n, record)


def test_battery_alert_lifecycle() -> None:
    """Test pending -> active after 60 s -> kept between 20 and 25 -> cleared at 25; open until acknowledged."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    engine.on_statuses([row("R1", 15, clock)])
    [alert] = engine.open_alerts()
    assert (alert.state, alert.rule, alert.severity) == ("pending", "battery_low", "warning")
    clock.advance(59)
    engine.tick()
    assert str(alert.state) == "pending"
    clock.advance(1)
    engine.tick()
    assert str(alert.state) == "active"
    clock.advance(5)
    engine.on_statuses([row("R1", 22, clock)])
    assert str(alert.state) == "active"
    engine.on_statuses([row("R1", 25, clock)])
    assert str(alert.state) == "cleared"
    assert alert.is_open  # came and went: still shown until someone acknowledges it
    engine.acknowledge(alert, "night-shift")
    assert not alert.is_open
    assert engine.open_alerts() == []
    assert [(t.from_state, t.to_state, t.by) for t in alert.history] == [
        (None, "pending", None),
        ("pending", "active", None),
        ("active", "cleared", None),
        ("unacknowledged", "acknowledged", "night-shift"),
    ]
    # Low again after clearing: a new alert.
    engine.on_statuses([row("R1", 10, clock)])
    [again] = engine.open_alerts()
    assert again.id != alert.id


def test_open_alerts_of_one_robot_follow_the_lifecycle() -> None:
    """Test that a robot's open alerts (its retained MQTT message) are its own, through open, clear and ack."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    engine.on_statuses([row(serial, 10, clock) for serial in ("R1", "R2", "R3")])
    assert [alert.serial_number for alert in engine.open_alerts("R2")] == ["R2"]
    clock.advance(61)
    engine.tick()
    engine.on_statuses([row("R2", 30, clock)])  # active, then cleared: open until acknowledged
    [cleared] = engine.open_alerts("R2")
    assert str(cleared.state) == "cleared"
    engine.acknowledge(cleared, "night-shift")
    assert engine.open_alerts("R2") == []
    assert sorted(alert.serial_number for alert in engine.open_alerts()) == ["R1", "R3"]
    assert engine.open_alerts("R9") == []


def test_wavering_battery_opens_one_alert() -> None:
    """Test that a battery wavering between 19 and 21 for minutes opens a single alert, not one a minute."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    created: list[str] = []
    engine.listeners.append(lambda alert, t: created.append(alert.id) if t.from_state is None else None)
    for n in range(300):
        clock.advance(1)
        engine.on_statuses([row("R1", 19 if n % 2 else 21, clock)])
        engine.tick()
    assert len(created) == 1
    assert engine.open_alerts()[0].state == "active"


def test_pending_alert_that_clears_never_reaches_the_open_list() -> None:
    """Test that a dip shorter than the rule's duration leaves nothing open."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    engine.on_statuses([row("R1", 15, clock)])
    clock.advance(10)
    engine.on_statuses([row("R1", 30, clock)])
    assert engine.open_alerts() == []
    assert engine.current == {}


def test_rejection_ratio_rule_needs_enough_statuses_and_slides() -> None:
    """Test >10% rejected over 5 minutes opens only with 10 statuses seen, and clears as the window slides."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    for _ in range(3):
        engine.on_rejection("R1", clock.advance(1))
    assert engine.open_alerts() == []  # 3 of 3 rejected, but only 3 seen
    for n in range(7):
        engine.on_statuses([row("R1", 80, clock, n)])
    [alert] = engine.open_alerts()
    assert (alert.rule, alert.state, alert.value) == ("rejections_high", "active", 0.3)
    clock.advance(301)
    engine.tick()
    assert str(alert.state) == "cleared"


def test_rejection_ratio_counts_the_whole_window() -> None:
    """Test that statuses anywhere in the last 5 minutes dilute the rejections, and none older than that."""
    clock = Clock()
    engine = AlertEngine(DEFAULT_RULES, clock=clock)
    for n in range(200):
        clock.advance(1)
        engine.on_statuses([row("R1", 80, clock, n)])
    for _ in range(10):
        engine.on_rejection("R1", clock.advance(1))
    assert engine.open_alerts() == []  # 10 of 210 over the window
    clock.advance(301)
    for _ in range(10):
        engine.on_rejection("R1", clock.advance(1))
    [alert] = engine.open_alerts()
    assert (alert.rule, alert.value) == ("rejections_high", 1.0)


def test_unknown_robot_rule_follows_the_registry() -> None:
    """Test the unknown-robot rule (off by default): opens for an unregistered robot, clears once registered."""
    clock = Clock()
    registry: set[str] = set()
    rules = [dataclasses.replace(rule, enabled=True) for rule in DEFAULT_RULES if rule.kind == "unregistered"]
    engine = AlertEngine(rules, clock=clock, registered=registry.__contains__)
    engine.on_statuses([row("STRANGER", 80, clock)])
    [alert] = engine.open_alerts()
    assert str(alert.state) == "active"
    registry.add("STRANGER")
    engine.on_registered("STRANGER")
    assert str(alert.state) == "cleared"
    assert AlertEngine(DEFAULT_RULES, clock=clock).rules == DEFAULT_RULES[:3]  # off by default


def test_example_rules_file_loads() -> None:
    """Test that examples/alerts.toml is a valid rules file equal to the defaults plus one rule."""
    rules = load_rules(EXAMPLE)
    assert rules[:4] == DEFAULT_RULES
    assert rules[4].name == "too_high"
    assert rules[4].opens(121)
    assert rules[4].clears(110)
    assert not rules[4].clears(115)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nname = "x"\nkind = "weather"', "kind must be one of"),
        ('[[rule]]\nname = "x"\nkind = "threshold"\nfield = "battery_level"', "exactly one of below or above"),
        ('[[rule]]\nname = "x"\nkind = "threshold"\nfield = "mood"\nbelow = 1', "field must be one of"),
        ('[[rule]]\nname = "x"\nkind = "threshold"\nfield = "height"\nbelow = 5\nclear = 1', "safe side"),
        ('[[rule]]\nname = "x"\nkind = "presence"\nfor = 3', "unknown key(s) for"),
        ('[[rule]]\nname = "x"\nkind = "presence"\nstates = ["asleep"]', "states must list"),
        ('[[rule]]\nname = "x"\nkind = "rejections"\nratio = 2', "ratio must be from 0 to 1"),
        ('[[rule]]\nname = "x"\nkind = "presence"\n[[rule]]\nname = "x"\nkind = "presence"', "two rules"),
        ("rule = [", "is not valid TOML"),
        ("[alerts]\nx = 1", "unknown table"),
    ],
)
def test_bad_rules_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    """Test that a wrong rules file is refused at start with a message naming the problem."""
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="--alerts") as caught:
        load_rules(path)
    assert message in str(caught.value)


# ---- the whole path ------------------------------------------------------------------------------------------

FAST_RULES = """
[[rule]]
name = "battery_low"
kind = "threshold"
field = "battery_level"
below = 20
clear = 25
for_s = 0.2
severity = "critical"
"""
OPERATOR = ("operator", "pw-operator")


def basic(name: str, password: str) -> dict[str, str]:
    """HTTP Basic credentials as a header."""
    return {"Authorization": aiohttp.encode_basic_auth(name, password)}


def fast_settings(settings: Settings, tmp_path: Path, **changes: Any) -> Settings:
    """`settings` with the fast battery rule, a quick tick, and a users file holding a robot and an operator."""
    rules = tmp_path / "rules.toml"
    rules.write_text(FAST_RULES)
    users = Users(tmp_path / "users.json").with_user(known_user("R1", "pw-r1"))
    users.with_user(known_user(*OPERATOR, subscribe=["spotbox/#", "robot/#"])).save()
    return dataclasses.replace(
        settings, alerts_path=rules, ops_tick_s=0.05, users_path=tmp_path / "users.json", **changes
    )


async def scrape_active(box: Box) -> dict[str, float]:
    async with box.http.get(f"{box.base_url}/metrics") as resp:
        text = await resp.text()
    return {
        s.labels["severity"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "spotbox_alerts_active"
    }


async def next_alert(feed: Any, state: str) -> dict[str, Any]:
    """The next `alert` event of the feed in `state`."""
    async with asyncio.timeout(10):
        while True:
            event = await feed.next()
            if event.event == "alert" and event.json()["state"] == state:
                alert: dict[str, Any] = event.json()
                return alert


async def test_alert_lifecycle_over_api_feed_mqtt_and_metrics(
    make_box: BoxFactory, settings: Settings, tmp_path: Path
) -> None:
    """Test on both backends: a low battery becomes active, is acknowledged by a logged-in user, clears, and each
    step is on the robot's feed, /alerts, spotbox/alerts/{serial} (retained) and the active gauge."""
    box = await make_box(fast_settings(settings, tmp_path))
    auth = basic(*OPERATOR)
    robot_login = {"username": "R1", "password": "pw-r1"}
    async with (
        open_feed(box.http, f"{box.base_url}/robots/R1/feed", headers=auth, skip=("status",)) as feed,
        mqtt_client(box.mqtt_port, **robot_login) as robot,
    ):
        await robot.publish("robot/R1/status", payload(battery_level=10), qos=1)
        pending = await next_alert(feed, "pending")
        active = await next_alert(feed, "active")
        assert pending["id"] == active["id"]
        alert_id = active["id"]
        assert (await scrape_active(box))["critical"] == 1
        params = {"state": "active", "serial": "R1"}
        async with box.http.get(f"{box.base_url}/alerts", params=params, headers=auth) as resp:
            listed = await resp.json()
        assert [item["id"] for item in listed["items"]] == [alert_id]
        # Late subscribers get the robot's current alerts: the message is retained.
        async with mqtt_client(box.mqtt_port, username=OPERATOR[0], password=OPERATOR[1]) as watcher:
            await watcher.subscribe("spotbox/alerts/R1", qos=1)
            async with asyncio.timeout(10):
                message = await anext(aiter(watcher.messages))
        assert message.retain
        assert [a["id"] for a in orjson.loads(bytes(message.payload))] == [alert_id]

        async with box.http.post(f"{box.base_url}/alerts/{alert_id}/ack") as resp:
            assert resp.status == 401
        async with box.http.post(f"{box.base_url}/alerts/{alert_id}/ack", headers=auth) as resp:
            assert resp.status == 200
            acked = await resp.json()
        assert (acked["acknowledged"], acked["acknowledged_by"], acked["state"]) == (True, "operator", "active")
        await robot.publish("robot/R1/status", payload(battery_level=30), qos=1)
        cleared = await next_alert(feed, "cleared")
    assert cleared["open"] is False
    assert (await scrape_active(box))["critical"] == 0
    async with box.http.get(f"{box.base_url}/alerts/{alert_id}", headers=auth) as resp:
        shown = await resp.json()
    assert [(t["from"], t["to"], t["by"]) for t in shown["history"]] == [
        (None, "pending", None),
        ("pending", "active", None),
        ("unacknowledged", "acknowledged", "operator"),
        ("active", "cleared", None),
    ]
    async with box.http.get(f"{box.base_url}/alerts", params={"state": "open"}, headers=auth) as resp:
        assert (await resp.json())["items"] == []


async def test_alerts_survive_a_restart(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that an active alert is read back after a restart and its lifecycle goes on from there."""
    base = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'a.db'}", batch_wait_ms=1.0)
    settings = fast_settings(base, tmp_path)
    first = await make_box(settings)
    auth = basic("R1", "pw-r1")
    async with first.http.post(f"{first.base_url}/robots/R1/status", data=payload(battery_level=5), headers=auth):
        pass
    engine = first.server.app[OPS].alerts
    async with asyncio.timeout(10):
        while [alert.state for alert in engine.current.values()] != ["active"]:  # noqa: ASYNC110 - the tick moves it
            await asyncio.sleep(0.02)
    await first.http.close()
    await first.server.close()

    second = await make_box(settings)
    reader = basic(*OPERATOR)
    async with second.http.get(f"{second.base_url}/alerts", params={"state": "open"}, headers=reader) as resp:
        [alert] = (await resp.json())["items"]
    assert alert["state"] == "active"
    async with second.http.post(f"{second.base_url}/robots/R1/status", data=payload(battery_level=90), headers=auth):
        pass
    async with second.http.get(f"{second.base_url}/alerts/{alert['id']}", headers=reader) as resp:
        after = await resp.json()
    assert after["state"] == "cleared"
    assert [t["to"] for t in after["history"]] == ["pending", "active", "cleared"]


async def test_alerts_page_like_history(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that /alerts pages newest first with next_cursor, filters by since, and refuses bad parameters."""
    base = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'pg.db'}", batch_wait_ms=1.0)
    box = await make_box(dataclasses.replace(fast_settings(base, tmp_path), users_path=None))
    for n in range(5):
        async with box.http.post(f"{box.base_url}/robots/P{n}/status", data=payload(battery_level=5)) as resp:
            assert resp.status == 202
    seen: list[str] = []
    query = {"limit": "2"}
    while True:
        async with box.http.get(f"{box.base_url}/alerts", params=query) as resp:
            page = await resp.json()
        seen.extend(item["serial_number"] for item in page["items"])
        if page["next_cursor"] is None:
            break
        query["cursor"] = page["next_cursor"]
    assert seen == ["P4", "P3", "P2", "P1", "P0"]
    async with box.http.get(f"{box.base_url}/alerts", params={"since": "2999-01-01T00:00:00Z"}) as resp:
        assert (await resp.json())["items"] == []
    for bad in ({"state": "burning"}, {"cursor": "zz"}, {"limit": "0"}, {"since": "soon"}, {"serial": "a b"}):
        async with box.http.get(f"{box.base_url}/alerts", params=bad) as resp:
            assert resp.status == 400, bad
    async with box.http.get(f"{box.base_url}/alerts/nope") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no such alert"


async def test_webhook_gets_each_change_and_retries(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test against a real HTTP receiver: every state change is POSTed as JSON, a 500 is retried with backoff."""
    received: list[dict[str, Any]] = []
    attempts = 0
    done = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return web.Response(status=500)  # the first delivery fails: it must come again
        received.append(await request.json())
        if len(received) == 2:
            done.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        base = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'w.db'}", batch_wait_ms=1.0)
        settings = dataclasses.replace(
            fast_settings(base, tmp_path), users_path=None, alert_webhook=f"http://127.0.0.1:{port}/hook"
        )
        box = await make_box(settings)
        box.server.app[OPS].webhook.first_delay_s = 0.05  # type: ignore[union-attr]
        async with box.http.post(f"{box.base_url}/robots/W1/status", data=payload(battery_level=5)) as resp:
            assert resp.status == 202
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        await runner.cleanup()
    assert attempts == 3
    assert [(d["transition"]["from"], d["transition"]["to"]) for d in received] == [
        (None, "pending"),
        ("pending", "active"),
    ]
    assert received[0]["alert"]["serial_number"] == "W1"
    assert received[0]["alert"]["id"] == received[1]["alert"]["id"]


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"stale_after_s": 60.0, "offline_after_s": 30.0}, "--offline-after"),
        ({"rejections_kept": 0}, "rejections_kept"),
        ({"ops_tick_s": 0.0}, "rejections_kept"),
    ],
)
def test_operations_settings_are_checked(tmp_path: Path, changes: dict[str, Any], option: str) -> None:
    """Test the operations settings checked across fields or without an option (the rest: tests/test_settings.py)."""
    with pytest.raises(ConfigError, match=option):
        Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", **changes)


async def test_a_burst_of_alert_changes_does_not_hold_status_commits(database_url: str) -> None:
    """Test that a burst of alert changes (a fleet's robots crossing a threshold in the same second) is written
    in transactions that status batches take turns with: a status written during the burst is committed before
    the burst is, and every change of the burst is written in the end."""
    burst_size = 8 * WRITE_BATCH_MAX
    storage = open_storage(DatabaseURL.parse(database_url))
    await storage.open()
    try:
        writer = AlertWriter(storage)
        now = datetime.now(UTC)
        for n in range(burst_size):
            serial = f"R-{n:05d}"
            alert = Alert(str(uuid.uuid4()), "battery_low", serial, "warning", "pending", now, now, "low", 5.0)
            writer.add(alert, Transition(now, None, "pending"))
        burst = asyncio.create_task(writer.write_pending())
        for _ in range(10):
            await asyncio.sleep(0)  # turns enough for the burst's first transaction to reach the database
        clock = Clock()
        (row_id,) = await storage.write_batch([row("R-STATUS", 50, clock).record])
        assert row_id is not None
        assert not burst.done()
        ((written,),) = await storage.query("SELECT count(*) FROM alert", [])
        assert written < burst_size
        await burst
        ((written,),) = await storage.query("SELECT count(*) FROM alert", [])
        assert written == burst_size
    finally:
        await storage.close()
