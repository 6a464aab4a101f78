"""Presence: online while the publishing connection is up, stale without statuses, offline once it ends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotbox.ops.presence import Presence, RobotPresence, State
from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, open_feed, payload
from tests.raw_mqtt import publish, raw_session

T0 = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)


class Clock:
    """A receive clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def changes(presence: Presence) -> list[tuple[str, State, State]]:
    """A list that collects (serial, before, after) for every change of `presence`."""
    seen: list[tuple[str, State, State]] = []

    def record(robot: RobotPresence, before: State) -> None:
        seen.append((robot.serial_number, before, robot.state))

    presence.listeners.append(record)
    return seen


def test_stale_after_three_median_gaps_with_a_floor() -> None:
    """Test that a robot is stale after 3x its median gap (at least 10 s), then offline after offline-after."""
    clock = Clock()
    presence = Presence(offline_after_s=120, clock=clock)
    seen = changes(presence)
    for _ in range(5):
        presence.status_committed("R1", clock.advance(5))
    robot = presence.robots["R1"]
    assert str(robot.state) == "online"
    assert presence.stale_after(robot) == 15.0
    clock.advance(14)
    presence.tick()
    assert str(robot.state) == "online"
    clock.advance(2)
    presence.tick()
    assert str(robot.state) == "stale"
    clock.advance(120)
    presence.tick()
    assert str(robot.state) == "offline"
    assert seen == [("R1", "unknown", "online"), ("R1", "online", "stale"), ("R1", "stale", "offline")]
    # A robot publishing every second still gets the 10 s floor.
    for _ in range(5):
        presence.status_committed("FAST", clock.advance(1))
    assert presence.stale_after(presence.robots["FAST"]) == 10.0


def test_connection_end_is_offline_and_a_status_brings_it_back() -> None:
    """Test that the end of the connection that published a robot's last status makes it offline at once."""
    clock = Clock()
    presence = Presence(clock=clock)
    first, second = object(), object()
    presence.status_committed("R1", clock.advance(1))
    presence.status_committed("R1", clock.now, first)  # the broker names the connection after the commit
    presence.status_committed("R2", clock.now, first)
    presence.status_committed("R2", clock.advance(1), second)  # R2 moved to another connection
    presence.connection_closed(first)
    assert str(presence.robots["R1"].state) == "offline"
    assert presence.robots["R1"].since == clock.now
    assert presence.robots["R2"].state == "online"
    presence.status_committed("R1", clock.advance(1))
    assert str(presence.robots["R1"].state) == "online"
    # A repeated call for one status adds no gap.
    assert list(presence.robots["R1"].gaps) == [2.0]


def test_restart_is_unknown_until_stale_after_then_judged_by_last_seen() -> None:
    """Test that after a start known robots are unknown (not offline) until stale-after has passed."""
    clock = Clock()
    presence = Presence(stale_after_s=30, offline_after_s=300, clock=clock)
    presence.seed([("RECENT", T0 - timedelta(seconds=60)), ("OLD", T0 - timedelta(hours=2)), ("NEVER", None)])
    presence.seed([("BACK", T0 - timedelta(seconds=5))])
    presence.status_committed("BACK", clock.advance(1))
    clock.advance(20)
    presence.tick()
    assert {s: r.state for s, r in presence.robots.items()} == {
        "RECENT": "unknown",
        "OLD": "unknown",
        "NEVER": "unknown",
        "BACK": "online",
    }
    clock.advance(10)
    presence.tick()
    assert {s: r.state for s, r in presence.robots.items()} == {
        "RECENT": "stale",
        "OLD": "offline",
        "NEVER": "offline",
        "BACK": "stale",
    }


async def gauges(box: Box) -> dict[str, float]:
    """The spotbox_robots{presence} samples of /metrics."""
    async with box.http.get(f"{box.base_url}/metrics") as resp:
        text = await resp.text()
    return {
        sample.labels["presence"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "spotbox_robots"
    }


async def presence_of(box: Box, serial: str) -> str:
    async with box.http.get(f"{box.base_url}/robots/{serial}") as resp:
        body = await resp.json()
    state: str = body["presence"]
    return state


async def test_mqtt_robot_goes_online_stale_and_offline(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test over real MQTT: online on a status, stale with a short --stale-after, offline when the client leaves;
    each change is a `presence` event on /feed and moves the gauges."""
    box = await make_box(
        Settings(
            http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'p.db'}", batch_wait_ms=1.0,
            stale_after_s=0.3, ops_tick_s=0.05,
        )
    )  # fmt: skip
    async with open_feed(box.http, f"{box.base_url}/feed", skip=("status", "alert")) as feed:
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish("robot/P1/status", payload(), qos=1)
            async with asyncio.timeout(10):
                online = (await feed.next()).json()
                stale = (await feed.next()).json()
            assert (online["serial_number"], online["previous"], online["presence"]) == ("P1", "unknown", "online")
            assert (stale["previous"], stale["presence"]) == ("online", "stale")
            assert await presence_of(box, "P1") == "stale"
            await robot.publish("robot/P1/status", payload(battery_level=70), qos=1)
            async with asyncio.timeout(10):
                assert (await feed.next()).json()["presence"] == "online"
            assert (await gauges(box))["online"] == 1
        async with asyncio.timeout(10):
            offline = (await feed.next()).json()
    assert (offline["previous"], offline["presence"]) == ("online", "offline")
    async with box.http.get(f"{box.base_url}/robots") as resp:
        [item] = (await resp.json())["items"]
    assert item["presence"] == "offline"
    assert item["presence_since"] == offline["presence_since"]
    metrics = await gauges(box)
    assert (metrics["online"], metrics["offline"]) == (0, 1)


async def test_http_robot_is_online_while_statuses_arrive(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that a robot posting over HTTP is online, then stale when its statuses stop (no connection to end)."""
    box = await make_box(
        Settings(
            http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'h.db'}", batch_wait_ms=1.0,
            stale_after_s=0.3, ops_tick_s=0.05,
        )
    )  # fmt: skip
    async with box.http.post(f"{box.base_url}/robots/H1/status", data=payload()) as resp:
        assert resp.status == 202
    assert await presence_of(box, "H1") == "online"
    async with asyncio.timeout(10):
        while await presence_of(box, "H1") != "stale":  # noqa: ASYNC110 - polled over HTTP, as a client would
            await asyncio.sleep(0.05)


async def test_restart_does_not_mark_the_fleet_offline(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that robots stored before a restart are `unknown` right after it, not offline."""
    settings = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'r.db'}", batch_wait_ms=1.0)
    first = await make_box(settings)
    async with first.http.post(f"{first.base_url}/robots/R1/status", data=payload()) as resp:
        assert resp.status == 202
    await first.http.close()
    await first.server.close()
    second = await make_box(settings)
    assert await presence_of(second, "R1") == "unknown"
    assert (await gauges(second))["unknown"] == 1


@pytest.mark.parametrize("qos", [0, 1])
async def test_a_status_committed_after_its_client_left_leaves_the_robot_offline(
    make_box: BoxFactory, tmp_path: Path, qos: int
) -> None:
    """Test that a robot whose client closes the connection before its status is committed (at QoS 0 at once, at
    QoS 1 before the PUBACK) is offline once the status is stored, not online for --offline-after."""
    box = await make_box(
        Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'p.db'}", batch_wait_ms=1.0)
    )
    async with raw_session(box.mqtt_port, f"leaver-{qos}") as (client, _):
        await client.send(publish("robot/LEAVER/status", payload(), qos=qos, packet_id=1))
    async with asyncio.timeout(10):
        while not await box.history("LEAVER"):  # noqa: ASYNC110 - polled over HTTP, as a client would
            await asyncio.sleep(0.02)
        while (state := await presence_of(box, "LEAVER")) != "offline":
            assert state in ("unknown", "online")
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # nothing brings it back online afterwards
    assert await presence_of(box, "LEAVER") == "offline"


def test_time_rules_set_past_any_date_keep_robots_online() -> None:
    """Test that stale and offline times longer than dates reach (`--stale-after inf --offline-after inf`, a way
    to turn the time rules off) leave a silent robot online, tick after tick, instead of failing each tick."""
    clock = Clock()
    presence = Presence(stale_after_s=float("inf"), offline_after_s=float("inf"), clock=clock)
    presence.status_committed("R1", clock.advance(5))
    clock.advance(10**9)
    presence.tick()
    assert str(presence.robots["R1"].state) == "online"


def test_a_status_seen_elsewhere_long_ago_gives_the_state_of_its_age() -> None:
    """Test that a status another instance stored long ago (read from the shared table late, after an outage of
    this instance's) makes the robot stale or offline at once, never online for a tick first, and that a recent
    one makes it online; a status older than the last one known changes nothing."""
    clock = Clock()
    presence = Presence(stale_after_s=30, offline_after_s=300, clock=clock)
    seen = changes(presence)
    clock.advance(10_000)
    presence.seen_elsewhere("GONE", clock.now - timedelta(seconds=3_600))
    presence.seen_elsewhere("QUIET", clock.now - timedelta(seconds=60))
    presence.seen_elsewhere("HERE", clock.now - timedelta(seconds=2))
    assert seen == [("GONE", "unknown", "offline"), ("QUIET", "unknown", "stale"), ("HERE", "unknown", "online")]
    assert presence.robots["GONE"].last_seen == clock.now - timedelta(seconds=3_600)
    assert presence.robots["HERE"].since == clock.now - timedelta(seconds=2)
    # A newer status, recent: online again, and the gap since the last one is kept for stale-after.
    presence.seen_elsewhere("GONE", clock.now - timedelta(seconds=1))
    assert seen[-1] == ("GONE", "offline", "online")
    assert list(presence.robots["GONE"].gaps) == [3_599.0]
    presence.seen_elsewhere("GONE", clock.now - timedelta(seconds=5_000))  # older than the last one known
    assert seen[-1] == ("GONE", "offline", "online")
    presence.tick()
    assert {serial: robot.state for serial, robot in presence.robots.items()} == {
        "GONE": "online",
        "QUIET": "stale",
        "HERE": "online",
    }
