"""GET /stats and its window: the last hour of MQTT and HTTP ingest, per robot, in bounded per-minute buckets."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotbox.stats import StatsWindow
from tests.conftest import Box
from tests.helpers import mqtt_client, payload, status
from tests.test_history_api import get
from tests.test_http_ingest import post

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

EMPTY: dict[str, Any] = {
    "window_s": 3600,
    "received": 0,
    "valid": 0,
    "rejected": 0,
    "rejected_by_reason": {},
    "robots": {},
}


class Clock:
    """A settable clock for the window: seconds, as time.monotonic gives them."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_stats_count_mqtt_and_http_per_robot(box: Box) -> None:
    """Test that /stats counts received, valid and rejected-by-field statuses of both transports, per robot."""
    async with mqtt_client(box.mqtt_port) as robot:
        await robot.publish("robot/R-MQTT/status", payload(), qos=1)
        await robot.publish("robot/R-MQTT/status", payload(timestamp="2026-11-22T10:00:01Z"), qos=1)
        await robot.publish("robot/R-MQTT/status", payload(battery_level=150), qos=1)
        # A status topic whose serial cannot be a robot's counts in the totals only.
        await robot.publish("robot/not a serial/status", payload(), qos=1)
    assert (await post(box, "R-HTTP", status()))[0] == 202
    assert (await post(box, "R-HTTP", status(driving_status="PARKED")))[0] == 422
    assert (await post(box, "R-HTTP", b"{oops"))[0] == 400
    code, body = await get(box, "/stats")
    assert code == 200
    assert body == {
        "window_s": 3600,
        "received": 7,
        "valid": 3,
        "rejected": 4,
        "rejected_by_reason": {"battery_level": 1, "serial_number": 1, "driving_status": 1, "payload": 1},
        "robots": {
            "R-HTTP": {
                "received": 3,
                "valid": 1,
                "rejected": 2,
                "rejected_by_reason": {"driving_status": 1, "payload": 1},
            },
            "R-MQTT": {"received": 3, "valid": 2, "rejected": 1, "rejected_by_reason": {"battery_level": 1}},
        },
    }
    # The totals since start are still kept beside the window.
    assert box.pipeline.stats.received == 7
    assert box.pipeline.stats.rejected.total() == 4


async def test_stats_before_any_status(box: Box) -> None:
    """Test that /stats answers zeros and no robots before anything arrives."""
    assert await get(box, "/stats") == (200, EMPTY)


def test_window_slides_by_the_minute() -> None:
    """Test that a count stays for the hour of its minute and is dropped after it, leaving later ones."""
    clock = Clock()
    window = StatsWindow(clock)
    clock.now = 30.0  # minute 0
    window.count("R1", None)
    clock.now = 1830.0  # minute 30
    window.count("R1", "battery_level")
    window.count("R2", None)
    clock.now = 3599.0  # minute 59: both minutes still inside the last hour
    assert window.snapshot()["received"] == 3
    clock.now = 3600.0  # minute 60: minute 0 has left the window
    snapshot = window.snapshot()
    assert (snapshot["received"], snapshot["valid"], snapshot["rejected"]) == (2, 1, 1)
    assert snapshot["robots"]["R1"] == {
        "received": 1,
        "valid": 0,
        "rejected": 1,
        "rejected_by_reason": {"battery_level": 1},
    }
    clock.now = 5400.0  # minute 90: everything is older than an hour
    assert window.snapshot() == EMPTY


# A robot's statuses: minutes to wait before each (0: the same minute; up to past the hour) and whether it is valid.
STATUS_GAPS = st.lists(st.tuples(st.sampled_from([0, 0, 1, 2, 59, 60, 61, 200]), st.booleans()), max_size=30)


@settings(max_examples=200, deadline=None)
@given(gaps=STATUS_GAPS, wait=st.sampled_from([0, 1, 30, 59, 60, 61]))
def test_robot_counts_are_those_of_its_last_hour(gaps: list[tuple[int, bool]], wait: int) -> None:
    """Test that a robot's received and valid counts are those of the statuses of the last 60 minutes, whatever
    minutes it was silent for before and since (the window keeps running sums, not a sum of slots)."""
    clock = Clock()
    window = StatsWindow(clock)
    minute = 0
    sent: list[tuple[int, bool]] = []
    for gap, valid in gaps:
        minute += gap
        clock.now = minute * 60.0 + 1
        window.count("R1", None if valid else "battery_level")
        sent.append((minute, valid))
    minute += wait
    clock.now = minute * 60.0 + 1
    inside = [valid for at, valid in sent if at > minute - 60]
    robot = window.snapshot()["robots"].get("R1", {"received": 0, "valid": 0})
    assert (robot["received"], robot["valid"]) == (len(inside), sum(inside))


def test_window_memory_is_bounded() -> None:
    """Test that the window never holds more than an hour of buckets, nor more robots per bucket than its cap."""
    clock = Clock()
    window = StatsWindow(clock, max_robots=3)
    most = 0
    for step in range(5 * 360):  # five hours, a status every 10 s
        clock.now = step * 10.0
        window.count(f"R{step % 5}", None)
        most = max(most, window.bucket_count)
    assert most == 60
    snapshot = window.snapshot()
    # Six statuses a minute for the 60 minutes in the window; only three robots are itemised per bucket.
    assert snapshot["received"] == 360
    assert len(snapshot["robots"]) <= 5
    assert sum(robot["received"] for robot in snapshot["robots"].values()) < 360


def test_window_costs_a_few_bytes_per_robot_minute() -> None:
    """Test that a full hour of 2,000 robots, each with a status a minute, holds under 20 bytes per robot-minute
    (it was about 225: 135 MB an hour at 10,000 robots)."""
    clock = Clock()
    robots, minutes = 2000, 60
    tracemalloc.start()
    try:
        window = StatsWindow(clock)
        for minute in range(minutes):
            clock.now = minute * 60.0
            for n in range(robots):
                window.count(f"R{n:05d}", "battery_level" if n == minute else None)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    snapshot = window.snapshot()
    assert snapshot["received"] == robots * minutes
    assert snapshot["rejected"] == minutes
    assert snapshot["robots"]["R00001"]["received"] == minutes
    assert snapshot["robots"]["R00001"]["rejected_by_reason"] == {"battery_level": 1}
    assert held / (robots * minutes) < 20, f"{held / (robots * minutes):.1f} bytes per robot-minute"
