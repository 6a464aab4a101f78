"""Live feeds: committed rows fanned out to Server-Sent Events streams, one bounded buffer per stream."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from spotbox.errors import StorageError
from spotbox.status import StatusRow, StoredStatus, dumps
from spotbox.storage import Storage
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)

# Rows read from storage per query while replaying what a resuming client missed.
REPLAY_PAGE = 500


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One SSE event, encoded once and shared by every stream that receives it."""

    event: str
    id: str | None
    data: str


class FeedStream:
    """One client's buffer. When it overflows the stream is ended with an `overflow` event."""

    def __init__(self, serial_number: str | None, buffer: int) -> None:
        self.serial_number = serial_number
        self._queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue(buffer + 1)
        self._buffer = buffer
        self.closed = False

    @property
    def name(self) -> str:
        """What the stream follows, for logs and task names."""
        return self.serial_number or "fleet"

    def push(self, event: FeedEvent) -> None:
        """Queue an event without ever waiting: ingest must not slow down for a slow reader."""
        if self.closed:
            return
        if self._queue.qsize() >= self._buffer:
            self.closed = True
            self._queue.put_nowait(FeedEvent("overflow", None, '{"error": "stream fell too far behind; reconnect"}'))
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        """End the stream after what is already queued."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)

    async def next(self) -> FeedEvent | None:
        """The next event, or None once the stream is over."""
        event = await self._queue.get()
        if event is not None and event.event == "overflow":
            self._queue.put_nowait(None)
        return event


def status_event(row: StoredStatus | StatusRow) -> FeedEvent:
    """The `status` event of a committed row; its SSE id is the row id."""
    return FeedEvent("status", str(row.id), dumps(row.to_api()).decode())


class FeedHub:
    """Who is watching which robot, and who is watching the whole fleet."""

    def __init__(self, buffer: int = 1000) -> None:
        self._streams: dict[str, set[FeedStream]] = defaultdict(set)
        self._fleet: set[FeedStream] = set()
        self._buffer = buffer

    @contextmanager
    def subscribe(self, serial_number: str | None) -> Iterator[FeedStream]:
        """A stream of one robot's committed statuses (or, for None, the fleet's) for the duration of the block."""
        stream = FeedStream(serial_number, self._buffer)
        streams = self._fleet if serial_number is None else self._streams[serial_number]
        streams.add(stream)
        try:
            yield stream
        finally:
            streams.discard(stream)
            if serial_number is not None and not streams:
                del self._streams[serial_number]

    @property
    def stream_count(self) -> int:
        """Open streams across every robot and the fleet."""
        return len(self._fleet) + sum(len(streams) for streams in self._streams.values())

    def publish(self, rows: Sequence[StoredStatus]) -> None:
        """Hand committed rows to the streams of their robots and to the fleet streams; never blocks."""
        for row in rows:
            streams = self._streams.get(row.record.serial_number)
            if not streams and not self._fleet:
                continue
            event = status_event(row)
            for stream in (*(streams or ()), *self._fleet):
                stream.push(event)

    def publish_rejected(self, rejection: Rejection, received_at: datetime) -> None:
        """Tell the fleet streams a status was refused; costs nothing while none is open."""
        if not self._fleet:
            return
        data = {
            "serial_number": rejection.serial_number,
            "field": rejection.field,
            "reason": rejection.reason,
            "received_at": received_at,
        }
        event = FeedEvent("rejected", None, dumps(data).decode())
        for stream in self._fleet:
            stream.push(event)

    def close_all(self) -> None:
        """End every stream, for shutdown."""
        for streams in (self._fleet, *self._streams.values()):
            for stream in streams:
                stream.close()


@dataclass(slots=True)
class Replay:
    """The stored rows a resuming client missed: those of one robot (or, for None, the fleet) with id > `last_id`."""

    storage: Storage
    serial_number: str | None
    last_id: int
    _page: list[StatusRow] = field(default_factory=list)

    async def fetch(self) -> None:
        """Read the next page of missed rows from storage."""
        self._page = await self.storage.rows_after(self.serial_number, self.last_id, REPLAY_PAGE)

    async def send(self, response: EventSourceResponse, stream: FeedStream) -> bool:
        """Send the missed rows, a page at a time; False when `stream` closed before the last one was sent."""
        while self._page:
            # Released as it is sent: an open feed holds no replay page once it streams live rows.
            page, self._page = self._page, []
            for row in page:
                await _send(response, status_event(row))
            self.last_id = page[-1].id
            if len(page) < REPLAY_PAGE:
                break
            # Overflowed, shut down or left: no point reading on (a short last page, though, completes the replay).
            if stream.closed:
                return False
            await self.fetch()
        return True


async def _send(response: EventSourceResponse, event: FeedEvent) -> None:
    await response.send(event.data, id=event.id, event=event.event)


async def serve_feed(
    request: web.Request, stream: FeedStream, ping_interval: float, replay: Replay | None = None
) -> web.StreamResponse:
    """Write `stream` to the client as SSE until either side ends it, after the rows `replay` names.

    The stream must be subscribed before this is called: every row committed after that is in its buffer, every
    row committed before is in storage (ids follow commit order), so storage first, then the buffer minus the ids
    already sent, leaves neither a gap nor a repeat.
    """
    if replay is not None:
        # Read before answering, so a storage outage is a 503 in the JSON error shape.
        await replay.fetch()
    async with sse_response(request, ping_interval=ping_interval) as response:
        # The ping task ends when the client goes away; end the stream with it.
        gone = asyncio.create_task(response.wait(), name=f"sse-wait-{stream.name}")
        gone.add_done_callback(lambda _: stream.close())
        try:
            complete = replay is None or await replay.send(response, stream)
            last_id = replay.last_id if replay is not None else 0
            while (event := await stream.next()) is not None:
                # Cut short (overflow, shutdown), the replay left a gap before the live rows: send none of them.
                if event.id is not None and (not complete or int(event.id) <= last_id):
                    continue
                await _send(response, event)
        except (ConnectionResetError, TimeoutError):
            logger.debug("feed client of %s went away", stream.name)
        except StorageError as exc:
            # The client resumes from the last row it got, once storage is back.
            logger.warning("feed of %s ended: replay failed: %s", stream.name, exc)
        finally:
            gone.cancel()
    return response
