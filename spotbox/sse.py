"""Live feeds: committed rows fanned out to Server-Sent Events streams, one bounded buffer per stream."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web
from aiohttp_sse import sse_response

from spotbox.status import StoredStatus, dumps

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One SSE event, encoded once and shared by every stream that receives it."""

    event: str
    id: str | None
    data: str


class FeedStream:
    """One client's buffer. When it overflows the stream is ended with an `overflow` event."""

    def __init__(self, serial_number: str, buffer: int) -> None:
        self.serial_number = serial_number
        self._queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue(buffer + 1)
        self._buffer = buffer
        self.closed = False

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


class FeedHub:
    """Who is watching which robot."""

    def __init__(self, buffer: int = 1000) -> None:
        self._streams: dict[str, set[FeedStream]] = defaultdict(set)
        self._buffer = buffer

    @contextmanager
    def subscribe(self, serial_number: str) -> Iterator[FeedStream]:
        """A stream of one robot's committed statuses for the duration of the block."""
        stream = FeedStream(serial_number, self._buffer)
        self._streams[serial_number].add(stream)
        try:
            yield stream
        finally:
            streams = self._streams[serial_number]
            streams.discard(stream)
            if not streams:
                del self._streams[serial_number]

    @property
    def stream_count(self) -> int:
        """Open streams across every robot."""
        return sum(len(streams) for streams in self._streams.values())

    def publish(self, rows: Sequence[StoredStatus]) -> None:
        """Hand committed rows to the streams of their robots; never blocks."""
        for row in rows:
            streams = self._streams.get(row.record.serial_number)
            if not streams:
                continue
            event = FeedEvent("status", str(row.id), dumps(row.to_api()).decode())
            for stream in streams:
                stream.push(event)

    def close_all(self) -> None:
        """End every stream, for shutdown."""
        for streams in self._streams.values():
            for stream in streams:
                stream.close()


async def serve_feed(request: web.Request, stream: FeedStream, ping_interval: float) -> web.StreamResponse:
    """Write `stream` to the client as SSE until either side ends it."""
    async with sse_response(request, ping_interval=ping_interval) as response:
        # The ping task ends when the client goes away; end the stream with it.
        gone = asyncio.create_task(response.wait(), name=f"sse-wait-{stream.serial_number}")
        gone.add_done_callback(lambda _: stream.close())
        try:
            while (event := await stream.next()) is not None:
                await response.send(event.data, id=event.id, event=event.event)
        except (ConnectionResetError, TimeoutError):
            logger.debug("feed client of %s went away", stream.serial_number)
        finally:
            gone.cancel()
    return response
