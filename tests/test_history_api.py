"""GET /robots/{serial}/history: paging, time ranges, payloads, and the one error shape for bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from spotbox.status import StatusRecord
from spotbox.storage import sqlite_read
from spotbox.storage.base import HistoryQuery
from tests.conftest import Box
from tests.helpers import payload
from tests.test_storage import T0, VALIDATOR, record, record_at


async def seed(box: Box, serial: str, minutes: list[int]) -> list[StatusRecord]:
    """Store statuses of `serial` at T0 + each minute through the real storage."""
    records = [record(serial, minute, firmware=f"fw-{minute}") for minute in minutes]
    await box.storage.write_batch(records)
    return records


async def get(box: Box, path: str, **params: Any) -> tuple[int, Any]:
    async with box.http.get(f"{box.base_url}{path}", params=params) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_pages_follow_the_cursor_in_time_order(box: Box) -> None:
    """Test that limit pages the history in ts order and next_cursor walks every row exactly once."""
    await seed(box, "R1", [7, 3, 5, 1, 2, 6, 4])
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3}
    pages = 0
    while True:
        status, page = await get(box, "/robots/R1/history", **params)
        assert status == 200
        assert page["serial_number"] == "R1"
        assert len(page["items"]) <= 3
        seen.extend(item["ts"] for item in page["items"])
        pages += 1
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    assert pages == 3
    assert seen == [(T0 + timedelta(minutes=m)).isoformat().replace("+00:00", "Z") for m in range(1, 8)]


async def test_exact_last_page_has_no_cursor(box: Box) -> None:
    """Test that a page ending exactly at the last row says there is no next page."""
    await seed(box, "R1", [1, 2])
    _, page = await get(box, "/robots/R1/history", limit=2)
    assert len(page["items"]) == 2
    assert page["next_cursor"] is None


async def test_time_range_is_inclusive_and_accepts_offsets(box: Box) -> None:
    """Test start_time/end_time filtering, with a +01:00 offset converted to UTC."""
    await seed(box, "R1", [1, 2, 3, 4, 5])
    _, page = await get(box, "/robots/R1/history", start_time="2026-11-22T10:02:00Z", end_time="2026-11-22T10:04:00Z")
    assert [item["ts"][14:16] for item in page["items"]] == ["02", "03", "04"]
    # 11:02 at +01:00 is 10:02 UTC; a time without an offset is UTC.
    _, page = await get(
        box, "/robots/R1/history", start_time="2026-11-22T11:02:00+01:00", end_time="2026-11-22T10:03:00"
    )
    assert [item["ts"][14:16] for item in page["items"]] == ["02", "03"]


async def test_include_payload_adds_the_raw_message(box: Box) -> None:
    """Test that include_payload=true adds the raw payload, extra fields included, and only then."""
    await seed(box, "R1", [1])
    _, plain = await get(box, "/robots/R1/history")
    assert "payload" not in plain["items"][0]
    _, full = await get(box, "/robots/R1/history", include_payload="true")
    assert full["items"][0]["payload"]["firmware"] == "fw-1"
    assert full["items"][0]["payload"]["battery_level"] == 80


async def test_status_shape(box: Box) -> None:
    """Test that a history item has exactly the fields README documents."""
    await seed(box, "R1", [1])
    _, page = await get(box, "/robots/R1/history")
    item = page["items"][0]
    assert set(item) == {
        "id",
        "serial_number",
        "ts",
        "received_at",
        "battery_level",
        "battery_status",
        "driving_status",
        "current_drive_id",
        "location",
    }
    assert item["received_at"] == "2026-11-22T10:01:01Z"
    assert item["current_drive_id"] == "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"


async def test_unknown_robot_is_404(box: Box) -> None:
    """Test that the history of a robot never seen is a 404 in the one error shape."""
    status, body = await get(box, "/robots/NEVER-SEEN/history")
    assert status == 404
    assert body == {"error": "unknown robot", "detail": {"serial_number": "NEVER-SEEN"}}


async def test_known_robot_with_empty_range_is_an_empty_page(box: Box) -> None:
    """Test that a known robot with nothing in the asked range gets 200 and no items."""
    await seed(box, "R1", [1])
    status, page = await get(box, "/robots/R1/history", start_time="2030-01-01T00:00:00Z")
    assert status == 200
    assert page == {"serial_number": "R1", "items": [], "next_cursor": None}


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit must be an integer from 1 to 5000"),
        ({"limit": "5001"}, "limit must be an integer from 1 to 5000"),
        ({"limit": "ten"}, "limit must be an integer from 1 to 5000"),
        ({"start_time": "yesterday"}, "start_time is not an ISO 8601 date-time"),
        ({"end_time": "2026-13-01"}, "end_time is not an ISO 8601 date-time"),
        ({"start_time": "2026-11-22T11:00:00Z", "end_time": "2026-11-22T10:00:00Z"}, "start_time is after end_time"),
        ({"include_payload": "maybe"}, "include_payload must be true or false"),
        ({"cursor": "not-a-cursor"}, "cursor is not one this server issued"),
        ({"cursor": "%%%"}, "cursor is not one this server issued"),
    ],
)
async def test_bad_parameters_are_400(box: Box, params: dict[str, str], message: str) -> None:
    """Test that each bad query parameter is a 400 naming it, in the one error shape."""
    await seed(box, "R1", [1])
    status, body = await get(box, "/robots/R1/history", **params)
    assert status == 400
    assert body["error"] == message
    assert set(body) == {"error", "detail"}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("serial", ["a" * 65, "bad%20serial", "..%2F..%2Fetc"])
async def test_bad_serial_is_400(box: Box, serial: str) -> None:
    """Test that a serial that cannot be a robot's is refused, history and feed alike."""
    for route in ("history", "feed"):
        async with box.http.get(f"{box.base_url}/robots/{serial}/{route}") as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"] == "invalid serial number"


@pytest.mark.sqlite_only
async def test_unknown_route_uses_the_error_shape(box: Box) -> None:
    """Test that even a 404 for a route that does not exist is the one JSON error shape."""
    status, body = await get(box, "/nothing/here")
    assert status == 404
    assert set(body) == {"error", "detail"}


@pytest.mark.sqlite_only
async def test_a_page_joined_out_of_order_is_built_from_rows(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a history page SQLite joins out of (ts, id) order (a fault injected into the one-statement page,
    whose group_concat order SQLite does not promise) is answered with the same JSON and cursors as a page in
    order, built from rows: items in time order, the next page after the right item."""
    whole = T0 + timedelta(seconds=30)
    times = [whole + timedelta(minutes=2), whole, whole + timedelta(minutes=1), whole + timedelta(microseconds=1)]
    await box.storage.write_batch([record_at("R1", ts) for ts in times])

    async def walk() -> list[Any]:
        pages: list[Any] = []
        params: dict[str, Any] = {"limit": 3}
        while True:
            status, page = await get(box, "/robots/R1/history", **params)
            assert status == 200
            pages.append(page)
            if page["next_cursor"] is None:
                return pages
            params["cursor"] = page["next_cursor"]

    in_order = await walk()
    assert [item["ts"][14:] for page in in_order for item in page["items"]] == [
        "00:30Z",
        "00:30.000001Z",
        "01:30Z",
        "02:30Z",
    ]
    text_sql = sqlite_read.history_text_sql

    def joined_in_reverse(query: HistoryQuery) -> tuple[str, list[Any]]:
        sql, params = text_sql(query)
        head, rows = sql.split(" FROM (", 1)
        return f"{head} FROM (SELECT * FROM ({rows} ORDER BY item DESC)", params

    monkeypatch.setattr(sqlite_read, "history_text_sql", joined_in_reverse)
    assert await walk() == in_order


async def test_pages_walk_rows_at_the_first_and_last_representable_times(box: Box) -> None:
    """Test that statuses stamped 0001-01-01T00:00:00Z (a clock that was never set: .NET's DateTime.MinValue) and
    9999-12-31T23:59:59.999999Z page like any others, each once and in order, and that a time range at those
    instants holds them (asyncpg sends those two datetimes as -infinity and infinity)."""
    received = datetime.now(UTC)
    written = []
    for n, ts in enumerate([datetime.min.replace(tzinfo=UTC)] * 3 + [datetime.max.replace(tzinfo=UTC)] * 3):
        verdict = VALIDATOR.check("R1", payload(timestamp=ts.isoformat(), firmware=f"fw-{n}"), received)
        assert isinstance(verdict, StatusRecord)
        written.append(verdict)
    ids = await box.storage.write_batch(written)
    for limit in (1, 2, 4):
        seen: list[int] = []
        params: dict[str, Any] = {"limit": limit}
        for _ in range(8):
            status, page = await get(box, "/robots/R1/history", **params)
            assert status == 200
            seen.extend(item["id"] for item in page["items"])
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
        assert seen == ids, f"limit {limit}"
    _, page = await get(box, "/robots/R1/history", start_time="9999-12-31T23:59:59.999999Z")
    assert [item["id"] for item in page["items"]] == ids[3:]
    _, page = await get(box, "/robots/R1/history", end_time="0001-01-01T00:00:00Z")
    assert [item["id"] for item in page["items"]] == ids[:3]
