"""Downsampled history (`interval`, `agg`): buckets computed by the database, checked against the raw rows."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotbox.status import StatusRecord, from_micros, parse_utc, to_micros
from tests.conftest import Box
from tests.helpers import payload
from tests.test_history_api import get
from tests.test_storage import VALIDATOR, record_at

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
INTERVALS = {"1m": 60, "90s": 90, "7m": 420, "1h": 3600}


async def seed_irregular(box: Box, serial: str = "DS") -> None:
    """Three hours of statuses at irregular times with varied levels and places, a ts tie, and another robot."""
    rng = random.Random(6)
    records = []
    for _ in range(240):
        ts = T0 + timedelta(seconds=rng.randrange(3 * 3600), microseconds=rng.randrange(1_000_000))
        location = {"latitude": rng.uniform(-90, 90), "longitude": rng.uniform(-180, 180), "height": rng.uniform(0, 99)}
        records.append(record_at(serial, ts, battery_level=rng.randint(1, 100), location=location))
    # Same robot and ts, two payloads: `last` must take the one stored later (greater id).
    tie = T0 + timedelta(minutes=42, seconds=7)
    records += [record_at(serial, tie, battery_level=5), record_at(serial, tie, battery_level=95)]
    # Bucket edges: exactly on a minute and an hour, and the microsecond before.
    edge = T0 + timedelta(hours=1)
    records += [record_at(serial, edge, battery_level=60), record_at(serial, edge - timedelta(microseconds=1))]
    await box.storage.write_batch(records)
    await box.storage.write_batch([record_at("OTHER", T0 + timedelta(minutes=m), battery_level=1) for m in range(90)])


def expected(rows: list[dict[str, Any]], seconds: int, agg: str) -> list[dict[str, Any]]:
    """The buckets computed here, in Python, from the raw history rows."""
    step = seconds * 1_000_000
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(to_micros(parse_utc(row["ts"])) // step * step, []).append(row)
    items = []
    for start in sorted(groups):
        group = groups[start]
        levels = [row["battery_level"] for row in group]
        item: dict[str, Any] = {"bucket": from_micros(start).isoformat().replace("+00:00", "Z"), "count": len(group)}
        if agg == "avg":
            item["battery_level"] = pytest.approx(sum(levels) / len(levels))
        elif agg in ("min", "max"):
            item["battery_level"] = min(levels) if agg == "min" else max(levels)
        elif agg == "last":
            newest = max(group, key=lambda row: (to_micros(parse_utc(row["ts"])), row["id"]))
            item["battery_level"] = newest["battery_level"]
            item["location"] = newest["location"]
        items.append(item)
    return items


@pytest.mark.parametrize("agg", ["avg", "min", "max", "last", "count"])
async def test_buckets_match_the_raw_rows(box: Box, agg: str) -> None:
    """Test that every bucket's count and aggregate equals the one computed here from the raw rows, each interval."""
    await seed_irregular(box)
    rows = await box.history("DS", limit="5000")
    assert len(rows) == 244
    for label, seconds in INTERVALS.items():
        status, body = await get(box, "/robots/DS/history", interval=label, agg=agg)
        assert status == 200
        assert (body["serial_number"], body["interval"], body["agg"]) == ("DS", label, agg)
        assert body["items"] == expected(rows, seconds, agg), label
        assert sum(item["count"] for item in body["items"]) == len(rows)


async def test_time_range_cuts_buckets_and_avg_is_the_default(box: Box) -> None:
    """Test that start_time/end_time bound the rows aggregated (partial edge buckets), with agg=avg by default."""
    await seed_irregular(box)
    start, end = "2026-11-22T10:03:30Z", "2026-11-22T11:17:10.5Z"
    rows = await box.history("DS", start_time=start, end_time=end, limit="5000")
    status, body = await get(box, "/robots/DS/history", interval="10m", start_time=start, end_time=end)
    assert status == 200
    assert body["agg"] == "avg"
    assert body["items"] == expected(rows, 600, "avg")
    assert body["items"][0]["bucket"] == "2026-11-22T10:00:00Z"


async def test_buckets_before_1970_are_floored(box: Box) -> None:
    """Test that buckets of times before the Unix epoch start at the minute below, as after it."""
    times = ["1969-12-31T23:58:30Z", "1969-12-31T23:59:59.5Z", "1970-01-01T00:00:00Z", "1970-01-01T00:00:30Z"]
    await box.storage.write_batch([record_at("OLD", parse_utc(ts), battery_level=n + 1) for n, ts in enumerate(times)])
    _, body = await get(box, "/robots/OLD/history", interval="1m", agg="max")
    assert body["items"] == [
        {"bucket": "1969-12-31T23:58:00Z", "count": 1, "battery_level": 1},
        {"bucket": "1969-12-31T23:59:00Z", "count": 1, "battery_level": 2},
        {"bucket": "1970-01-01T00:00:00Z", "count": 2, "battery_level": 4},
    ]


async def test_buckets_at_the_first_and_last_representable_times(box: Box) -> None:
    """Test that statuses stamped 0001-01-01T00:00:00Z (a clock never set) and 9999-12-31T23:59:59.999999Z are
    bucketed like any others, with the range left to the robot's own or given at those instants (asyncpg sends
    those two datetimes as -infinity and infinity)."""
    received = datetime.now(UTC)
    first, last = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
    records: list[StatusRecord] = []
    for serial, ts in (("EARLY", first), ("EARLY", first), ("LATE", last)):
        verdict = VALIDATOR.check(serial, payload(timestamp=ts.isoformat(), firmware=str(len(records))), received)
        assert isinstance(verdict, StatusRecord)
        records.append(verdict)
    await box.storage.write_batch(records)
    early = {"bucket": "0001-01-01T00:00:00Z", "count": 2, "battery_level": 80.0}
    late = {"bucket": "9999-12-31T23:00:00Z", "count": 1, "battery_level": 80.0}
    for params, items in (
        ({}, [early]),
        ({"end_time": "0001-01-01T00:00:00Z"}, [early]),
        ({"start_time": "0001-01-01T00:00:00Z", "end_time": "0001-01-01T00:59:59Z"}, [early]),
    ):
        _, body = await get(box, "/robots/EARLY/history", interval="1h", **params)
        assert body["items"] == items, params
    for params in ({}, {"start_time": "9999-12-31T23:59:59.999999Z"}):
        _, body = await get(box, "/robots/LATE/history", interval="1h", **params)
        assert body["items"] == [late], params
    # Epoch-aligned buckets of 7 days and of 10 years begin before year 1: the first starts at its first instant.
    for interval in ("7d", "3650d"):
        for agg in ("avg", "count", "last"):
            status, body = await get(
                box, "/robots/EARLY/history", interval=interval, agg=agg, end_time="0001-02-01T00:00:00Z"
            )
            assert status == 200, body
            assert [(item["bucket"], item["count"]) for item in body["items"]] == [("0001-01-01T00:00:00Z", 2)]


async def test_bucket_limit_is_5000(box: Box) -> None:
    """Test that 5000 buckets are served and 5001 refused, counted over the asked range or the robot's rows."""
    await box.storage.write_batch([record_at("R1", T0), record_at("R1", T0 + timedelta(hours=2))])
    path, start = "/robots/R1/history", "2026-11-22T10:00:00Z"
    status, body = await get(box, path, interval="1s", start_time=start, end_time="2026-11-22T11:23:19Z")
    assert status == 200
    assert [item["count"] for item in body["items"]] == [1]
    status, body = await get(box, path, interval="1s", start_time=start, end_time="2026-11-22T11:23:20Z")
    assert status == 400
    assert body["error"] == "too many buckets: at most 5000; widen the interval or narrow the time range"
    assert body["detail"] == {"buckets": 5001, "interval": "1s"}
    # No range given: the robot's first and last rows, two hours apart, make 7201 one-second buckets.
    status, body = await get(box, path, interval="1s")
    assert (status, body["detail"]) == (400, {"buckets": 7201, "interval": "1s"})


async def test_known_robot_with_nothing_in_range_has_no_buckets(box: Box) -> None:
    """Test that a known robot with no rows in the asked range gets 200 and no buckets."""
    await box.storage.write_batch([record_at("R1", T0)])
    status, body = await get(box, "/robots/R1/history", interval="1m", start_time="2030-01-01T00:00:00Z")
    assert (status, body["items"]) == (200, [])


async def test_unknown_robot_is_404(box: Box) -> None:
    """Test that downsampling a robot never seen is a 404 in the one error shape."""
    status, body = await get(box, "/robots/NEVER-SEEN/history", interval="1m")
    assert status == 404
    assert body == {"error": "unknown robot", "detail": {"serial_number": "NEVER-SEEN"}}


INTERVAL_ERROR = "interval must be a whole number of s, m, h or d, from 1s to 3650d (e.g. 1m)"


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"interval": "0m"}, INTERVAL_ERROR),
        ({"interval": "5x"}, INTERVAL_ERROR),
        ({"interval": "m"}, INTERVAL_ERROR),
        ({"interval": "1.5m"}, INTERVAL_ERROR),
        ({"interval": "-1m"}, INTERVAL_ERROR),
        ({"interval": "1M"}, INTERVAL_ERROR),
        ({"interval": "3651d"}, INTERVAL_ERROR),
        ({"interval": "99999999999999999999d"}, INTERVAL_ERROR),
        ({"interval": ""}, INTERVAL_ERROR),
        ({"interval": "1m", "agg": "median"}, "agg must be one of avg, min, max, last, count"),
        ({"agg": "avg"}, "agg needs an interval"),
        ({"interval": "1m", "cursor": "abc"}, "cursor does not apply to a downsampled history"),
        ({"interval": "1m", "limit": "10"}, "limit does not apply to a downsampled history"),
        ({"interval": "1m", "include_payload": "true"}, "include_payload does not apply to a downsampled history"),
        (
            {"interval": "1m", "start_time": "2026-11-22T11:00:00Z", "end_time": "2026-11-22T10:00:00Z"},
            "start_time is after end_time",
        ),
    ],
)
async def test_bad_parameters_are_400(box: Box, params: dict[str, str], message: str) -> None:
    """Test that each bad downsampling parameter is a 400 naming it, in the one error shape."""
    await box.storage.write_batch([record_at("R1", T0)])
    status, body = await get(box, "/robots/R1/history", **params)
    assert status == 400
    assert body["error"] == message
    assert set(body) == {"error", "detail"}
