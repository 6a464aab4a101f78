"""SSE feeds: Last-Event-ID resume with no gap and no repeat, the fleet feed with rejections, slow consumers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import aiomqtt
import pytest
from aiohttp.test_utils import TestServer

from spotbox.app import create_app
from spotbox.errors import StorageUnavailableError
from spotbox.keys import HUB, ROWS
from spotbox.settings import Settings
from spotbox.sse import REPLAY_PAGE, FeedHub
from spotbox.status import StatusRow, parse_utc
from spotbox.validation import Rejection
from tests.conftest import Box
from tests.helpers import FeedReader, SseEvent, mqtt_client, open_feed, payload, stamp
from tests.test_storage import record

Publish = Callable[[str, int], Awaitable[None]]
# Decimal digits to str.isdigit, but not a row id.
FULLWIDTH_12 = "\uff11\uff12"


@pytest.fixture
async def robot(box: Box) -> AsyncIterator[aiomqtt.Client]:
    """A connected MQTT client of `box`."""
    async with mqtt_client(box.mqtt_port) as client:
        yield client


def publisher(client: aiomqtt.Client) -> Publish:
    """Publish the n-th status of a robot at QoS 1: once it returns, the row is committed (on PostgreSQL it reaches
    the hub a moment later, through the RowSource: see `on_the_hub`)."""

    async def publish(serial: str, n: int) -> None:
        await client.publish(f"robot/{serial}/status", payload(timestamp=stamp(n)), qos=1)

    return publish


async def take(feed: FeedReader, count: int) -> list[SseEvent]:
    """The next `count` events of a feed, waiting at most 10 s for them."""
    async with asyncio.timeout(10):
        return [await feed.next() for _ in range(count)]


def ids(events: list[SseEvent]) -> list[int]:
    """The row ids of `status` events, checking each event's id field matches its data."""
    assert all(event.event == "status" for event in events)
    assert all(event.id == str(event.json()["id"]) for event in events)
    return [event.json()["id"] for event in events]


async def history_ids(box: Box, serial: str) -> list[int]:
    return [item["id"] for item in await box.history(serial)]


async def test_resume_sends_exactly_the_missed_rows_then_live_ones(box: Box, robot: aiomqtt.Client) -> None:
    """Test that reconnecting with Last-Event-ID replays just the rows missed while away, then live rows follow."""
    publish = publisher(robot)
    url = f"{box.base_url}/robots/R1/feed"
    async with open_feed(box.http, url) as feed:
        for n in range(3):
            await publish("R1", n)
        before = await take(feed, 3)
    for n in range(3, 6):
        await publish("R1", n)
        await publish("R2", n)  # another robot's rows are not this feed's
    async with open_feed(box.http, url, headers={"Last-Event-ID": str(before[-1].id)}) as feed:
        missed = await take(feed, 3)
        for n in range(6, 8):
            await publish("R1", n)
        live = await take(feed, 2)
    stored = await history_ids(box, "R1")
    assert ids(before) == stored[:3]
    assert ids(missed) == stored[3:6]
    assert ids(live) == stored[6:8]
    assert [event.json()["ts"] for event in missed] == [stamp(n) for n in range(3, 6)]


async def test_resume_with_query_parameter_and_header_precedence(box: Box, robot: aiomqtt.Client) -> None:
    """Test that `last_event_id` resumes like the header, and that the header wins when both are sent."""
    publish = publisher(robot)
    for n in range(4):
        await publish("R1", n)
    stored = await history_ids(box, "R1")
    url = f"{box.base_url}/robots/R1/feed"
    async with open_feed(box.http, f"{url}?last_event_id={stored[1]}") as feed:
        assert ids(await take(feed, 2)) == stored[2:]
    async with open_feed(box.http, f"{url}?last_event_id=0", headers={"Last-Event-ID": str(stored[2])}) as feed:
        assert ids(await take(feed, 1)) == stored[3:]
        await publish("R1", 4)
        assert ids(await take(feed, 1)) == (await history_ids(box, "R1"))[4:]


async def test_rows_committed_during_the_replay_are_sent_once(
    box: Box, robot: aiomqtt.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a row committed just before the replay query reads and one just after are each sent once, in order."""
    publish = publisher(robot)
    for n in range(3):
        await publish("R1", n)
    read_rows = box.storage.rows_after
    calls = 0

    async def racing_rows_after(serial: str | None, after: int, limit: int) -> list[StatusRow]:
        # The feed has subscribed by now: this row is both on its live buffer and in the query's result.
        nonlocal calls
        calls += 1
        await publish("R1", 10 + calls)
        rows = await read_rows(serial, after, limit)
        # Committed after the query read: only the live buffer has it.
        await publish("R1", 20 + calls)
        return rows

    monkeypatch.setattr(box.storage, "rows_after", racing_rows_after)
    first = (await history_ids(box, "R1"))[0]
    async with open_feed(box.http, f"{box.base_url}/robots/R1/feed", headers={"Last-Event-ID": str(first)}) as feed:
        received = await take(feed, 4)
        await publish("R1", 30)
        received += await take(feed, 1)
    assert calls == 1
    assert ids(received) == (await history_ids(box, "R1"))[1:]
    assert [event.json()["ts"] for event in received] == [stamp(n) for n in (1, 2, 11, 21, 30)]


@pytest.mark.sqlite_only
async def test_bad_last_event_id_is_400(box: Box) -> None:
    """Test that a Last-Event-ID (header or query) that is not a row id is a 400 in the JSON error shape."""
    bad = ["abc", "-1", "+1", "1.5", "0x10", "9223372036854775808", "1" * 5000]
    for path in ("/robots/R1/feed", "/feed"):
        url = f"{box.base_url}{path}"
        # Headers are Latin-1 on the wire; other digits (fullwidth ones) can only come in the query.
        answers = [box.http.get(url, headers={"Last-Event-ID": value}) for value in bad]
        answers += [box.http.get(url, params={"last_event_id": value}) for value in [*bad, FULLWIDTH_12]]
        for value, answer in zip([*bad, *bad, FULLWIDTH_12], answers, strict=True):
            async with answer as resp:
                assert resp.status == 400, (path, value)
                body = await resp.json()
                assert body["error"].startswith("Last-Event-ID must be a row id")
                assert body["detail"] == {"last_event_id": value}


async def test_replay_during_storage_outage_is_503(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a resume the database cannot serve answers 503 in the JSON error shape, not a broken stream."""

    async def unreachable(serial: str | None, after: int, limit: int) -> list[StatusRow]:
        raise StorageUnavailableError("connection refused")

    monkeypatch.setattr(box.storage, "rows_after", unreachable)
    for path in ("/robots/R1/feed", "/feed"):
        async with box.http.get(f"{box.base_url}{path}", headers={"Last-Event-ID": "1"}) as resp:
            assert resp.status == 503
            assert await resp.json() == {"error": "storage unavailable, retry later", "detail": None}


async def test_fleet_feed_streams_every_robot_and_each_rejection(box: Box, robot: aiomqtt.Client) -> None:
    """Test that GET /feed carries every robot's statuses (id = row id) and an id-less `rejected` event per refusal."""
    async with open_feed(box.http, f"{box.base_url}/feed") as feed:
        await robot.publish("robot/R1/status", payload(timestamp=stamp(1)), qos=1)
        await robot.publish("robot/R2/status", payload(battery_level=150), qos=1)
        await robot.publish("robot/R2/status", b"{not json", qos=1)
        await robot.publish("robot/R2/status", payload(timestamp=stamp(2)), qos=1)
        events = await take(feed, 4)
    assert [event.event for event in events] == ["status", "rejected", "rejected", "status"]
    assert ids([events[0], events[3]]) == (await history_ids(box, "R1")) + (await history_ids(box, "R2"))
    assert [event.json()["serial_number"] for event in (events[0], events[3])] == ["R1", "R2"]
    rejected = events[1].json()
    assert events[1].id is None
    assert set(rejected) == {"serial_number", "field", "reason", "received_at"}
    assert rejected["serial_number"] == "R2"
    assert rejected["field"] == "battery_level"
    assert rejected["reason"] == "battery_level: 150 is greater than the maximum of 100"
    parse_utc(rejected["received_at"])
    assert events[2].json()["field"] == "payload"


async def test_fleet_feed_resumes_across_robots(box: Box, robot: aiomqtt.Client) -> None:
    """Test that /feed with Last-Event-ID replays every robot's missed rows in id order (rejections are not stored)."""
    publish = publisher(robot)
    async with open_feed(box.http, f"{box.base_url}/feed") as feed:
        await publish("R1", 0)
        (seen,) = await take(feed, 1)
    await publish("R2", 1)
    await robot.publish("robot/R3/status", payload(battery_level=0), qos=1)
    await publish("R1", 2)
    await publish("R3", 3)
    async with open_feed(box.http, f"{box.base_url}/feed", headers={"Last-Event-ID": str(seen.id)}) as feed:
        missed = await take(feed, 3)
        await robot.publish("robot/R3/status", payload(battery_level=0), qos=1)
        await publish("R2", 4)
        live = await take(feed, 2)
    assert [event.json()["serial_number"] for event in missed] == ["R2", "R1", "R3"]
    assert ids(missed) == sorted(ids(missed))
    assert ids(missed)[0] > int(str(seen.id))
    assert [event.event for event in live] == ["rejected", "status"]
    assert ids(live[1:]) == (await history_ids(box, "R2"))[1:]


@pytest.fixture
async def small_buffer_box(settings: Settings) -> AsyncIterator[Box]:
    """spotbox whose feeds hold only 2 undelivered events, so a stalled stream overflows at once."""
    app = create_app(settings)
    app[HUB] = FeedHub(buffer=2)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    box = Box(server, aiohttp.ClientSession())
    yield box
    await box.http.close()
    await server.close()


async def on_the_hub(box: Box) -> None:
    """Wait until every committed row is on the hub. On PostgreSQL the RowSource reads committed rows back and may
    hand a burst over one row at a time; a stream that takes each as it comes would never overflow."""
    rows = box.server.app.get(ROWS)
    if rows is None:
        return  # SQLite: the writer hands rows to the hub as it commits them
    last = await rows.storage.max_id()
    async with asyncio.timeout(10):
        while rows.last_id < last:  # noqa: ASYNC110 - the RowSource's progress raises no event
            await asyncio.sleep(0.005)


def stall_replay(box: Box, monkeypatch: pytest.MonkeyPatch, publish: Publish, burst: int) -> None:
    """While the first replay query runs, commit `burst` statuses: more than the live buffer holds."""
    read_rows = box.storage.rows_after
    stalled = False

    async def slow_rows_after(serial: str | None, after: int, limit: int) -> list[StatusRow]:
        nonlocal stalled
        if not stalled:
            stalled = True
            for n in range(burst):
                await publish("R1", 1000 + n)
            await on_the_hub(box)
        return await read_rows(serial, after, limit)

    monkeypatch.setattr(box.storage, "rows_after", slow_rows_after)


async def test_overflow_ends_a_slow_fleet_stream_without_repeats(
    small_buffer_box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a fleet stream whose buffer overflows sends what it has, once each, then `overflow`, then ends."""
    box = small_buffer_box
    async with mqtt_client(box.mqtt_port) as client:
        publish = publisher(client)
        await publish("R1", 0)
        stall_replay(box, monkeypatch, publish, burst=3)
        async with open_feed(box.http, f"{box.base_url}/feed", headers={"Last-Event-ID": "0"}) as feed:
            events = await take(feed, 5)
            with pytest.raises(EOFError):
                await take(feed, 1)
    assert ids(events[:4]) == await history_ids(box, "R1")
    assert events[4].event == "overflow"
    assert events[4].id is None


async def test_replay_cut_short_by_overflow_leaves_no_gap(
    small_buffer_box: Box, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that when the live buffer overflows mid-replay, no live row skips ahead, and resuming sends the rest."""
    box = small_buffer_box
    stored = await box.storage.write_batch([record("R1", minute) for minute in range(REPLAY_PAGE + 50)])
    async with mqtt_client(box.mqtt_port) as client:
        stall_replay(box, monkeypatch, publisher(client), burst=3)
        async with open_feed(box.http, f"{box.base_url}/feed", headers={"Last-Event-ID": "0"}) as feed:
            first = await take(feed, REPLAY_PAGE + 1)
            with pytest.raises(EOFError):
                await take(feed, 1)
    assert ids(first[:-1]) == stored[:REPLAY_PAGE]
    assert first[-1].event == "overflow"
    resume_from = str(first[-2].id)
    async with open_feed(box.http, f"{box.base_url}/feed", headers={"Last-Event-ID": resume_from}) as feed:
        rest = await take(feed, 53)
    # History is in ts order; the seeded rows are hours after the live ones: compare ids in commit order.
    assert ids(first[:-1]) + ids(rest) == sorted(await history_ids(box, "R1"))


async def test_rejections_reach_fleet_streams_only() -> None:
    """Test that a rejection goes to fleet streams and not to the robot's own feed, which carries stored rows only."""
    hub = FeedHub(buffer=10)
    rejection = Rejection("R1", ["battery_level: 0 is less than the minimum of 1"])
    with hub.subscribe("R1") as robot_stream, hub.subscribe(None) as fleet:
        assert hub.stream_count == 2
        hub.publish_rejected(rejection, parse_utc("2026-11-22T10:00:00Z"))
        robot_stream.close()
        fleet.close()
        event = await fleet.next()
        assert event is not None
        assert event.event == "rejected"
        assert await fleet.next() is None
        assert await robot_stream.next() is None
    assert hub.stream_count == 0
