"""POST /robots/{serial}/status: the same validation, pipeline and durability as MQTT, answered over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from spotbox.pipeline import OFF_LOOP_MIN
from spotbox.settings import Settings
from tests.cases import INVALID
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, open_feed, status
from tests.test_durability import Outage
from tests.test_validation import BAD_NUMBERS, GOOD_NUMBERS, _with_number

MAX_BODY = 1024 * 1024


async def post(box: Box, serial: str, body: Any, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST a body (a dict as JSON, bytes as they are, a generator chunked); code, JSON answer, response."""
    data = orjson.dumps(body) if isinstance(body, dict) else body
    if isinstance(data, bytes):
        # aiohttp warns about large bytes bodies; a file-like body is sent the same way, Content-Length included.
        data = io.BytesIO(data)
    async with box.http.post(f"{box.base_url}/robots/{serial}/status", data=data, **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json(), resp


async def test_accepted_status_is_committed_streamed_and_listed(box: Box) -> None:
    """Test that a 202 means stored: the row id answered is in the history, on the feed and in /robots."""
    async with open_feed(box.http, f"{box.base_url}/robots/ROBOT-H1/feed") as feed:
        code, body, _ = await post(box, "ROBOT-H1", status(firmware="http-1"))
        assert code == 202
        assert body == {"id": body["id"], "duplicate": False}
        assert isinstance(body["id"], int)
        # Durable: the history shows it as soon as the answer arrives.
        [stored] = await box.history("ROBOT-H1", include_payload="true")
        async with asyncio.timeout(10):
            event = await feed.next()
    assert stored["id"] == body["id"] == event.json()["id"]
    assert stored["payload"]["firmware"] == "http-1"
    async with box.http.get(f"{box.base_url}/robots/ROBOT-H1") as resp:
        assert (await resp.json())["latest"]["id"] == body["id"]


async def test_same_status_twice_is_a_duplicate(box: Box) -> None:
    """Test that resending a status (same robot, ts, payload) answers 202 duplicate with no id, stored once."""
    first = await post(box, "ROBOT-H2", status())
    again = await post(box, "ROBOT-H2", status())
    assert first[0] == again[0] == 202
    assert first[1]["duplicate"] is False
    assert again[1] == {"id": None, "duplicate": True}
    assert len(await box.history("ROBOT-H2")) == 1


@pytest.mark.sqlite_only
async def test_a_large_status_is_checked_off_the_event_loop_with_the_same_verdicts(box: Box) -> None:
    """Test that statuses past OFF_LOOP_MIN (validated on the validation thread) get the same answers: a valid one
    stored, an invalid one 422 naming its field, both counted."""
    extra = ["reading"] * (OFF_LOOP_MIN // 8)
    valid = await post(box, "ROBOT-BIG", status(extra=extra))
    invalid = await post(box, "ROBOT-BIG", status(extra=extra, battery_level=150))
    assert valid[0] == 202
    assert (invalid[0], invalid[1]["detail"]["field"]) == (422, "battery_level")
    assert len(await box.history("ROBOT-BIG")) == 1
    assert (box.pipeline.stats.received, box.pipeline.stats.rejected["battery_level"]) == (2, 1)


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("name", "doc", "field"), INVALID, ids=[case[0] for case in INVALID])
async def test_invalid_status_is_422_with_its_errors(box: Box, name: str, doc: dict[str, Any], field: str) -> None:
    """Test that each invalid case of tests/cases.py is a 422 naming the failing field, and is not stored."""
    code, body, _ = await post(box, "ROBOT-H3", doc)
    assert code == 422
    assert body["error"] == "invalid status"
    assert body["detail"]["field"] == field
    assert body["detail"]["errors"][0].startswith(f"{field}: ")
    assert await box.history("ROBOT-H3") == []


@pytest.mark.sqlite_only
async def test_rejections_are_counted_and_reported_like_mqtt_ones(box: Box) -> None:
    """Test that an HTTP rejection is counted and republished on spotbox/rejected/{serial} as an MQTT one is."""
    async with mqtt_client(box.mqtt_port) as watcher:
        await watcher.subscribe("spotbox/rejected/+", qos=1)
        code, _, _ = await post(box, "ROBOT-H4", status(battery_level=150))
        assert code == 422
        async with asyncio.timeout(10):
            message = await anext(aiter(watcher.messages))
    assert str(message.topic) == "spotbox/rejected/ROBOT-H4"
    assert isinstance(message.payload, bytes)
    report = orjson.loads(message.payload)
    assert report["topic"] == "robot/ROBOT-H4/status"
    assert report["errors"][0] == "battery_level: 150 is greater than the maximum of 100"
    assert box.pipeline.stats.rejected == {"battery_level": 1}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"", b'{"battery_level": 80'])
async def test_body_that_is_not_json_is_400(box: Box, raw: bytes) -> None:
    """Test that a body that is not JSON at all is a 400 (not a 422), counted as a `payload` rejection."""
    code, body, _ = await post(box, "ROBOT-H5", raw)
    assert code == 400
    assert body["error"] == "body is not JSON"
    assert body["detail"]["field"] == "payload"
    assert box.pipeline.stats.rejected == {"payload": 1}


@pytest.mark.sqlite_only
async def test_json_that_is_not_an_object_is_422(box: Box) -> None:
    """Test that JSON which is not an object is an invalid status (422), not a malformed body."""
    code, body, _ = await post(box, "ROBOT-H5", b"[1, 2]")
    assert code == 422
    assert body["detail"]["field"] == "payload"


@pytest.mark.sqlite_only
async def test_bad_serial_is_400(box: Box) -> None:
    """Test that a status posted for a serial that cannot be a robot's is a 400 and is not counted."""
    code, body, _ = await post(box, "a" * 65, status())
    assert code == 400
    assert body["error"] == "invalid serial number"
    assert box.pipeline.stats.received == 0


async def test_body_of_exactly_1_mib_is_accepted(box: Box) -> None:
    """Test that the size limit is inclusive: a valid status padded to exactly 1 MiB is stored."""
    raw = orjson.dumps(status())
    raw += b" " * (MAX_BODY - len(raw))
    assert len(raw) == MAX_BODY
    code, _, _ = await post(box, "ROBOT-H6", raw)
    assert code == 202
    assert len(await box.history("ROBOT-H6")) == 1


@pytest.mark.sqlite_only
async def test_body_over_1_mib_is_413(box: Box) -> None:
    """Test that a body over 1 MiB is a 413 in the error shape, whether its length is declared or streamed."""

    async def chunked() -> Any:
        # No Content-Length: the limit is enforced while the body is read.
        for _ in range(MAX_BODY // 65536 + 1):
            yield b" " * 65536

    expected = {"error": f"body larger than {MAX_BODY} bytes", "detail": {"max_bytes": MAX_BODY}}
    declared = await post(box, "ROBOT-H7", b" " * (MAX_BODY + 1))
    streamed = await post(box, "ROBOT-H7", chunked())
    assert (declared[0], declared[1]) == (413, expected)
    assert "Content-Length" not in streamed[2].request_info.headers
    assert (streamed[0], streamed[1]) == (413, expected)
    assert box.pipeline.stats.received == 0


async def test_body_limit_follows_max_payload(make_box: BoxFactory, settings: Settings) -> None:
    """Test that --max-payload sets the HTTP limit: a body of exactly the limit is stored, one byte more is 413."""
    limit = 1000
    box = await make_box(dataclasses.replace(settings, max_payload=limit))
    raw = orjson.dumps(status())
    raw += b" " * (limit - len(raw))

    async def chunked() -> Any:
        # No Content-Length: client_max_size stops the body while it is read.
        yield raw
        yield b" "

    expected = {"error": f"body larger than {limit} bytes", "detail": {"max_bytes": limit}}
    declared = await post(box, "ROBOT-H9", raw + b" ")
    streamed = await post(box, "ROBOT-H9", chunked())
    assert (declared[0], declared[1]) == (413, expected)
    assert (streamed[0], streamed[1]) == (413, expected)
    assert box.pipeline.stats.received == 0
    code, _, _ = await post(box, "ROBOT-H9", raw)
    assert code == 202
    assert len(await box.history("ROBOT-H9")) == 1


async def test_storage_outage_is_503_with_retry_after_then_recovers(
    make_box: BoxFactory, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that while storage fails, ingest answers 503 + Retry-After within the bound, then 202 once it is back."""
    box = await make_box(dataclasses.replace(settings, ingest_timeout_s=0.5))
    outage = Outage(box.storage, monkeypatch)
    async with open_feed(box.http, f"{box.base_url}/robots/ROBOT-H8/feed") as feed:
        # The writer is retrying this one when the bound runs out: not acknowledged.
        code, body, resp = await post(box, "ROBOT-H8", status(battery_level=11))
        assert code == 503
        assert body == {"error": "storage unavailable, retry later", "detail": None}
        assert resp.headers["Retry-After"] == "5"
        async with asyncio.timeout(10):
            await outage.retried.wait()
        # Known outage: refused at once instead of queued behind the batch being retried.
        assert not box.pipeline.storage_available
        code, _, resp = await post(box, "ROBOT-H8", status(battery_level=12))
        assert code == 503
        assert resp.headers["Retry-After"] == "5"
        outage.down = False
        async with asyncio.timeout(10):
            caught_up = await feed.next()
    # The status answered 503 was still queued, so it is stored once storage is back; its retry is a duplicate.
    assert caught_up.json()["battery_level"] == 11
    retry = await post(box, "ROBOT-H8", status(battery_level=11))
    assert (retry[0], retry[1]) == (202, {"id": None, "duplicate": True})
    code, body, _ = await post(box, "ROBOT-H8", status(battery_level=12))
    assert (code, body["duplicate"]) == (202, False)
    assert [item["battery_level"] for item in await box.history("ROBOT-H8")] == [11, 12]


async def test_unstorable_numbers_get_the_same_verdict_on_every_database(box: Box) -> None:
    """Test that numbers PostgreSQL could not keep are a 422 naming the field, and edge numbers are stored, on both."""
    for name, fragment, field in BAD_NUMBERS:
        code, body, _ = await post(box, "ROBOT-H8", _with_number(fragment))
        assert code == 422, (name, body)
        assert body["detail"]["field"] == field, name
    for name, fragment in GOOD_NUMBERS:
        code, body, _ = await post(box, "ROBOT-H8", _with_number(fragment).replace(b"10:00:00Z", b"10:00:01Z"))
        assert code == 202, (name, body)
        assert box.pipeline.stats.stored >= 1
        # Each edge case once: a new timestamp per case keeps them apart from the first one's row.
        await box.storage.delete_before(datetime(2100, 1, 1, tzinfo=UTC), 10)
    assert box.pipeline.stats.stored == len(GOOD_NUMBERS)


async def test_a_huge_refused_status_is_reported_in_bounded_size(box: Box) -> None:
    """Test that a 1 MB refused value gives short reasons in the 422, the rejected topic, /feed, and a 4 KiB copy."""
    raw = orjson.dumps(status(battery_level=[1e15] * 30_000, driving_status=["MOVING"] * 30_000))
    assert 800_000 < len(raw) < 1024 * 1024
    async with (
        mqtt_client(box.mqtt_port) as watcher,
        open_feed(box.http, f"{box.base_url}/feed") as feed,
    ):
        await watcher.subscribe("spotbox/rejected/+", qos=1)
        code, body, resp = await post(box, "ROBOT-H9", raw)
        assert code == 422
        assert resp.content_length is not None
        assert resp.content_length < 1000
        fields = [error.split(":")[0] for error in body["detail"]["errors"]]
        assert fields[:2] == ["battery_level", "driving_status"]
        async with asyncio.timeout(10):
            message = await anext(aiter(watcher.messages))
            event = await feed.next()
    assert isinstance(message.payload, bytes)
    report = orjson.loads(message.payload)
    assert report["payload_truncated"] is True
    assert report["payload"] == raw[:4096].decode()
    assert len(message.payload) < 6000
    assert all(len(error) <= 200 for error in report["errors"])
    assert event.event == "rejected"
    assert event.json()["field"] == "battery_level"
    assert len(event.json()["reason"]) <= 200


async def test_a_small_refused_status_is_reported_whole(box: Box) -> None:
    """Test that a refused payload under 4 KiB is copied whole to spotbox/rejected/{serial}, not marked truncated."""
    raw = orjson.dumps(status(battery_level=0))
    async with mqtt_client(box.mqtt_port) as watcher:
        await watcher.subscribe("spotbox/rejected/+", qos=1)
        assert (await post(box, "ROBOT-H9", raw))[0] == 422
        async with asyncio.timeout(10):
            message = await anext(aiter(watcher.messages))
    assert isinstance(message.payload, bytes)
    report = orjson.loads(message.payload)
    assert (report["payload"], report["payload_truncated"]) == (raw.decode(), False)
