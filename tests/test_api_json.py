"""The JSON clients parse, pinned: values and number formatting of every read route, whatever path builds it."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

from spotbox.settings import DatabaseURL
from spotbox.status import StatusRecord, dumps, parse_utc, payload_digest
from spotbox.storage import HistoryQuery, open_storage
from spotbox.storage.sqlite import SQLiteStorage
from tests.conftest import Box, fresh_postgres_schema
from tests.helpers import mqtt_client, open_feed, status
from tests.test_storage import VALIDATOR

SERIAL = "PIN-1"
DRIVE = "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"
# Statuses whose numbers and times are easy to print wrongly: integers stored as floats, exponents, negative
# zero, the smallest subnormal, 17 significant digits, microseconds, an offset, a time before 1970.
STATUSES: list[tuple[dict[str, Any], str]] = [
    (
        status(
            timestamp="2026-11-22T10:00:00Z",
            location={"latitude": 34, "longitude": -0.0, "height": 1e-7},
        ),
        "2026-11-22T10:00:01Z",
    ),
    (
        status(
            timestamp="2026-11-22T11:00:00.000001+01:00",
            driving_status="IDLE",
            current_drive_id=None,
            battery_status="CHARGING",
            battery_level=1,
            location={"latitude": 0.30000000000000004, "longitude": 13.405000000000001, "height": 1e16},
            firmware="fw-\u00e9",
            temps=[1.5, 2e-5, 100],
        ),
        "2026-11-22T10:00:01.250000Z",
    ),
    (
        status(
            timestamp="1969-12-31T23:59:59.5Z",
            battery_level=100,
            driving_status="IDLE",
            current_drive_id=...,
            location={"latitude": 5e-324, "longitude": 180, "height": -1.5e300},
        ),
        "2026-11-22T10:00:02.999999Z",
    ),
]


def literal(text: str | bytes) -> Any:
    """Parse JSON keeping each number as the text it was written as, so 34.0 and 34 stay different."""
    return json.loads(text, parse_float=lambda s: ("float", s), parse_int=lambda s: ("int", s))


def records() -> list[StatusRecord]:
    """The pinned statuses, validated as MQTT ingest validates them."""
    out = []
    for doc, received in STATUSES:
        verdict = VALIDATOR.check(SERIAL, orjson.dumps(doc), parse_utc(received))
        assert isinstance(verdict, StatusRecord), verdict
        out.append(verdict)
    return out


def expected_item(row_id: int, index: int, backend: str = "sqlite") -> dict[str, Any]:
    """Today's JSON of the index-th pinned status stored as row `row_id`, as `literal` parses it."""
    item = {"id": ("int", str(row_id)), "serial_number": SERIAL, **ITEMS[index]}
    if index == 0 and backend == "sqlite":
        # SQLite stores a REAL -0.0 as 0: the sign is lost there (PostgreSQL's float8 keeps it).
        item["location"] = {**item["location"], "longitude": ("float", "0.0")}
    return item


ITEMS: list[dict[str, Any]] = [
    {
        "ts": "2026-11-22T10:00:00Z",
        "received_at": "2026-11-22T10:00:01Z",
        "battery_level": ("int", "80"),
        "battery_status": "DISCHARGING",
        "driving_status": "MOVING",
        "current_drive_id": DRIVE,
        "location": {"latitude": ("float", "34.0"), "longitude": ("float", "-0.0"), "height": ("float", "1e-7")},
    },
    {
        "ts": "2026-11-22T10:00:00.000001Z",
        "received_at": "2026-11-22T10:00:01.250000Z",
        "battery_level": ("int", "1"),
        "battery_status": "CHARGING",
        "driving_status": "IDLE",
        "current_drive_id": None,
        "location": {
            "latitude": ("float", "0.30000000000000004"),
            "longitude": ("float", "13.405000000000001"),
            "height": ("float", "1e+16"),
        },
    },
    {
        "ts": "1969-12-31T23:59:59.500000Z",
        "received_at": "2026-11-22T10:00:02.999999Z",
        "battery_level": ("int", "100"),
        "battery_status": "DISCHARGING",
        "driving_status": "IDLE",
        "current_drive_id": None,
        "location": {
            "latitude": ("float", "5e-324"),
            "longitude": ("float", "180.0"),
            "height": ("float", "-1.5e+300"),
        },
    },
]


def backend(box: Box) -> str:
    """The kind of database `box` runs on."""
    return "sqlite" if isinstance(box.storage, SQLiteStorage) else "postgresql"


def exact_values(text: str | bytes) -> Any:
    """Parse JSON with every number as an exact Decimal: the values, whatever their formatting."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


async def stored(box: Box) -> list[int]:
    """Write the pinned statuses through the real storage; their row ids."""
    ids = await box.storage.write_batch(records())
    assert all(row_id is not None for row_id in ids)
    return [row_id for row_id in ids if row_id is not None]


async def text(box: Box, path: str, **params: str) -> bytes:
    async with box.http.get(f"{box.base_url}{path}", params=params) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        return await resp.read()


async def test_history_items_keep_their_json(box: Box) -> None:
    """Test that history items (by ts: the 1969 row first) are today's JSON, number formatting included."""
    ids = await stored(box)
    page = literal(await text(box, f"/robots/{SERIAL}/history"))
    order = [2, 0, 1]
    assert page == {
        "serial_number": SERIAL,
        "items": [expected_item(ids[i], i, backend(box)) for i in order],
        "next_cursor": None,
    }
    first = literal(await text(box, f"/robots/{SERIAL}/history", limit="1"))
    assert first["items"] == [expected_item(ids[2], 2)]
    assert isinstance(first["next_cursor"], str)
    rest = literal(await text(box, f"/robots/{SERIAL}/history", limit="2", cursor=first["next_cursor"]))
    assert rest["items"] == [expected_item(ids[i], i, backend(box)) for i in order[1:]]


async def test_history_payload_is_the_stored_message(box: Box) -> None:
    """Test that include_payload adds the stored message: SQLite's verbatim, PostgreSQL's jsonb with equal values."""
    ids = await stored(box)
    body = await text(box, f"/robots/{SERIAL}/history", include_payload="true")
    page, exact = literal(body), exact_values(body)
    for item, exact_item in zip(page["items"], exact["items"], strict=True):
        index = ids.index(int(item["id"][1]))
        sent = orjson.dumps(STATUSES[index][0])
        if backend(box) == "sqlite":
            assert item["payload"] == literal(sent)
        assert exact_item["payload"] == exact_values(sent)
        del item["payload"]
        assert item == expected_item(ids[index], index, backend(box))


async def test_latest_routes_keep_their_json(box: Box) -> None:
    """Test that /robots and /robots/{serial} show the latest row (greatest ts) with today's JSON, and `last_seen`
    the receive time of the last row stored (the third, an older ts received later)."""
    ids = await stored(box)
    robot = {
        "serial_number": SERIAL,
        # Written straight to storage after the start, never received: presence unknown, since nothing; unregistered.
        "presence": "unknown",
        "presence_since": None,
        "registered": False,
        "name": None,
        "model": None,
        "site": None,
        "tags": [],
        "last_seen": ITEMS[2]["received_at"],
        "latest": expected_item(ids[1], 1),
    }
    one, fleet = literal(await text(box, f"/robots/{SERIAL}")), literal(await text(box, "/robots"))
    if backend(box) == "postgresql":
        # Rows committed by any writer reach an instance through its row source (LISTEN/NOTIFY, as in a cluster),
        # which may see these and mark the robot online before either request: its presence is timing, not JSON.
        for shown in (one, fleet["items"][0]):
            assert (shown.pop("presence"), shown.pop("presence_since") is None) in {
                ("unknown", True),
                ("online", False),
            }
        del robot["presence"], robot["presence_since"]
    assert one == robot
    assert fleet == {"items": [robot]}


async def test_feed_data_keeps_its_json(box: Box) -> None:
    """Test that SSE data, replayed from storage and live from MQTT, is today's JSON of the status."""
    ids = await stored(box)
    async with open_feed(box.http, f"{box.base_url}/robots/{SERIAL}/feed", {"Last-Event-ID": "0"}) as feed:
        replayed = [literal((await feed.next()).data) for _ in ids]
        assert replayed == [expected_item(row_id, index, backend(box)) for index, row_id in enumerate(ids)]
        doc, _ = STATUSES[0]
        async with mqtt_client(box.mqtt_port) as robot:
            await robot.publish(f"robot/{SERIAL}/status", orjson.dumps({**doc, "battery_level": 2}), qos=1)
        event = await feed.next()
    live = literal(event.data)
    # Live events come from the validated status, not from a row read back: the sign of -0.0 is still there.
    expected = {**expected_item(int(event.id or 0), 0, "postgresql"), "battery_level": ("int", "2")}
    received = live.pop("received_at")
    del expected["received_at"]
    assert live == expected
    assert received.endswith("Z")
    assert datetime.fromisoformat(received) > datetime.fromisoformat(ITEMS[0]["received_at"])


ODD_TEXT = ['say "hi"', "back\\slash", "".join(map(chr, range(1, 32))), "\x7f \u2028 \u00e9 \U0001f600", "</script>"]


def _float_mix(rng: random.Random) -> float:
    """A float as robots send them (6 to 7 decimals, sums that need 17 digits, whole numbers) or far from them."""
    kind = rng.randrange(6)
    if kind == 0:
        return round(rng.uniform(-180, 180), rng.randrange(1, 8))
    if kind == 1:
        return rng.uniform(-90, 90) + 1e-6 * rng.randrange(100)
    if kind == 2:
        return float(rng.randrange(-1000, 1000))
    if kind == 3:
        return rng.choice((-1.0, 1.0)) * math.pow(10, rng.uniform(-30, 30))
    if kind == 4:
        return float(rng.choice((5e-324, 1e-31, 1.5e300, -1.7976931348623157e308, 1e200)))
    return rng.uniform(0, 1) * 10.0 ** rng.randrange(-5, 17)


async def test_history_page_text_is_the_rows_json(database_url: str) -> None:
    """Test that the history page the database writes as text is byte for byte the JSON built from its rows.

    Floats of every kind (6 decimals, 17 digits, whole, tiny, huge), text that needs escapes, times with and
    without microseconds around 1970 (some rows sharing one, some given in another zone), a page size of 1 to 500
    and the cursors between pages. Pages with a float the database cannot write as orjson does come from rows:
    both kinds are here.
    """
    rng = random.Random(12)
    start = datetime(1969, 12, 31, 23, 59, tzinfo=UTC)
    records: list[StatusRecord] = []
    for second in range(400):
        ts = start + timedelta(seconds=second, microseconds=rng.choice((0, 1, 250_000, 999_999)))
        if second % 7 == 1:  # rows of one time, in id order: a page may end between them
            ts = records[-1].ts
        elif second % 11 == 3:  # an instant given in another zone is written as UTC
            ts = ts.astimezone(timezone(timedelta(hours=-5)))
        lat, lon, height = (_float_mix(rng) if rng.random() < 0.3 else 52.5 + second * 1e-6 for _ in range(3))
        raw = orjson.dumps({"n": second})
        moving = second % 3 != 0
        # A schema of the user's own may allow any text: escapes (written straight to storage here) too.
        battery = rng.choice(ODD_TEXT) if second % 5 == 0 else "DISCHARGING" if moving else "CHARGING"
        records.append(
            StatusRecord(
                SERIAL, ts, ts + timedelta(milliseconds=second), 1 + second % 100,
                battery, "MOVING" if moving else "IDLE", DRIVE if moving else None,
                lat, lon, height, raw, payload_digest(raw),
            )
        )  # fmt: skip
    await _assert_pages_are_rows_json(database_url, records, start + timedelta(seconds=3), (1, 7, 100, 500))


async def test_long_escaped_statuses_are_stored_and_paged(database_url: str) -> None:
    """Test that a status whose texts escape to more than a PostgreSQL index entry holds (a schema of the user's own
    may allow them) is still stored, and its page, formatted at read, is the JSON built from rows."""
    ts = datetime(2026, 11, 22, 10, tzinfo=UTC)
    odd = ('"\\\n\x01' * 300)[:1200]
    records = []
    for second, battery in enumerate((odd, "CHARGING", odd[::-1])):
        raw = orjson.dumps({"n": second})
        moment = ts + timedelta(seconds=second)
        records.append(
            StatusRecord(SERIAL, moment, moment, 50, battery, odd[::-1], None, 52.5, 13.4, 34, raw, payload_digest(raw))
        )
    await _assert_pages_are_rows_json(database_url, records, ts, (1, 2, 3))


@pytest.mark.postgres
async def test_postgres_page_text_needs_shortest_floats() -> None:
    """Test that with extra_float_digits below 1 (PostgreSQL's floats then lose digits) pages come from rows."""
    ts = datetime(2026, 11, 22, 10, tzinfo=UTC)
    raw = orjson.dumps({"n": 1})
    record = StatusRecord(
        SERIAL, ts, ts, 50, "CHARGING", "IDLE", None, 0.30000000000000004, 13.405000000000001, 1.5, raw,
        payload_digest(raw),
    )  # fmt: skip
    async with fresh_postgres_schema() as url:
        await _assert_pages_are_rows_json(f"{url}&extra_float_digits=0", [record], ts, (1, 2))


async def _assert_pages_are_rows_json(
    database_url: str, records: list[StatusRecord], start: datetime, limits: tuple[int, ...]
) -> None:
    """Write `records`, then read every page of each size from `start`: each as `history` rows show them."""
    store = open_storage(DatabaseURL.parse(database_url))
    await store.open()
    try:
        await store.write_batch(records)
        for limit in limits:
            after = None
            while True:
                query = HistoryQuery(SERIAL, start, None, after, limit)
                page = await store.history_page(query, include_payload=False)
                rows = await store.history(dataclasses.replace(query, limit=limit + 1))
                shown = rows[:limit]
                assert page.items_json == dumps([row.to_api() for row in shown])
                assert page.count == len(shown)
                expected_after = (shown[-1].record.ts, shown[-1].id) if len(rows) > limit else None
                assert page.next_after == expected_after
                if page.next_after is None:
                    break
                after = page.next_after
    finally:
        await store.close()
