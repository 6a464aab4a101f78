"""Live feeds: committed rows fanned out to Server-Sent Events streams through one bounded log per watched feed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

from spotbox.errors import StorageError, TooManyStreamsError
from spotbox.status import StatusRow, StoredStatus, dumps
from spotbox.storage import Storage
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)

# Rows read from storage per query while replaying what a resuming client missed.
REPLAY_PAGE = 500


# Longest a write to one client may block before its connection is aborted (aiohttp-sse's default is 120 s).
SEND_TIMEOUT_S = 30.0
# Kernel send buffer of a feed's socket: 256 KiB (Linux doubles it) is about 600 statuses in flight, 2.5 MB/s
# to a client 100 ms away.
SEND_BUFFER = 256 * 1024
# At shutdown, how long streams get to hand their clients what is pending before their connections are cut.
SHUTDOWN_GRACE_S = 1.0


class FeedEvent:
    """One SSE event, encoded once (as the bytes on the wire) and shared by every stream that sends it.

    A status is encoded when a stream first sends it, not when it is committed: feeds whose clients have stopped
    reading cost no encoding at all. Until then it holds the row without its raw payload.
    """

    __slots__ = ("_row", "_wire", "event", "id")

    def __init__(self, event: str, row_id: int | None, wire: bytes | None = None, row: StatusRow | None = None) -> None:
        self.event = event
        self.id = row_id
        self._wire = wire
        self._row = row

    @classmethod
    def of(cls, event: str, row_id: int | None, data: bytes) -> FeedEvent:
        """The event `event` with JSON `data` (one line: orjson writes no newline) and the SSE id `row_id`."""
        return cls(event, row_id, _encode(event, row_id, data))

    @property
    def wire(self) -> bytes:
        """The event as sent: `id:` (if any), `event:` and `data:` lines, then an empty line."""
        if self._wire is None:
            assert self._row is not None
            self._wire = _encode(self.event, self.id, dumps(self._row.to_api()))
            self._row = None
        return self._wire


def _encode(event: str, row_id: int | None, data: bytes) -> bytes:
    head = b"" if row_id is None else b"id: %d\r\n" % row_id
    return b"%sevent: %s\r\ndata: %s\r\n\r\n" % (head, event.encode(), data)


OVERFLOW = FeedEvent.of("overflow", None, b'{"error": "stream fell too far behind; reconnect"}')


class FeedLog:
    """The recent events of one feed (one robot, or the fleet), kept once for all the streams that follow it.

    Holds at most `keep` events, and none that every stream has sent: appending costs the same for one stream or
    a thousand, and each stream reads everything new in one go.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.events: deque[FeedEvent] = deque()
        self.first = 0  # sequence number of events[0]
        self.streams: set[FeedStream] = set()

    @property
    def end(self) -> int:
        """Sequence number of the next event."""
        return self.first + len(self.events)

    def since(self, seq: int) -> list[FeedEvent]:
        """The events from sequence number `seq` (not before `first`) to the end."""
        return list(itertools.islice(self.events, seq - self.first, None))

    def flush(self) -> None:
        """After appending: wake the streams, and drop what all have taken or what is more than `keep` behind."""
        low = self.end
        for stream in self.streams:
            stream.wake.set()
            low = min(low, stream.seq)
        low = max(low, self.end - self.keep)
        while self.first < low:
            self.events.popleft()
            self.first += 1


class FeedStream:
    """One client's place in a feed's log. A stream more than `keep` events behind is ended with `overflow`."""

    def __init__(self, serial_number: str | None, log: FeedLog) -> None:
        self.serial_number = serial_number
        self.log = log
        self.seq = log.end
        self.wake = asyncio.Event()
        self._closing = False
        self._ended = False
        self._pending: deque[FeedEvent] = deque()
        self.transport: asyncio.Transport | None = None

    @property
    def name(self) -> str:
        """What the stream follows, for logs and task names."""
        return self.serial_number or "fleet"

    @property
    def closed(self) -> bool:
        """True once the stream is ending: closed, or overflowed (events it had not sent were dropped)."""
        return self._closing or self._ended or self.seq < self.log.first

    def close(self) -> None:
        """End the stream after what is already in its log."""
        self._closing = True
        self.wake.set()

    def abort(self) -> None:
        """Cut the client's connection: for shutdown, when it does not take what it is sent."""
        if self.transport is not None:
            self.transport.abort()

    async def next_batch(self) -> list[FeedEvent] | None:
        """Every event not yet taken (ending with `overflow` if it fell behind), or None once the stream is over."""
        while not self._ended:
            if self.seq < self.log.first:
                self._ended = True
                return [OVERFLOW]
            if self.seq < self.log.end:
                events = self.log.since(self.seq)
                self.seq = self.log.end
                return events
            if self._closing:
                self._ended = True
                break
            self.wake.clear()
            await self.wake.wait()
        return None

    async def next(self) -> FeedEvent | None:
        """The next event, or None once the stream is over."""
        if not self._pending:
            self._pending.extend(await self.next_batch() or ())
        return self._pending.popleft() if self._pending else None


def status_event(row: StoredStatus | StatusRow) -> FeedEvent:
    """The `status` event of a committed row; its SSE id is the row id. Encoded when first sent."""
    return FeedEvent("status", row.id, row=row if isinstance(row, StatusRow) else row.to_row())


class FeedHub:
    """Who is watching which robot, and who is watching the whole fleet: one log per watched feed."""

    def __init__(self, buffer: int = 1000, max_streams: int = 2000) -> None:
        self._logs: dict[str | None, FeedLog] = {}
        self._buffer = buffer
        self.max_streams = max_streams
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def subscribe(self, serial_number: str | None) -> Iterator[FeedStream]:
        """A stream of one robot's committed statuses (or, for None, the fleet's) for the duration of the block.

        Raises TooManyStreamsError when `max_streams` are open already.
        """
        if self._count >= self.max_streams:
            raise TooManyStreamsError(self.max_streams)
        log = self._logs.get(serial_number)
        if log is None:
            log = self._logs[serial_number] = FeedLog(self._buffer)
        stream = FeedStream(serial_number, log)
        log.streams.add(stream)
        self._count += 1
        self._idle.clear()
        try:
            yield stream
        finally:
            log.streams.discard(stream)
            self._count -= 1
            if not log.streams:
                del self._logs[serial_number]
            if not self._count:
                self._idle.set()

    @property
    def stream_count(self) -> int:
        """Open streams across every robot and the fleet."""
        return self._count

    def publish(self, rows: Sequence[StoredStatus]) -> None:
        """Hand committed rows to the logs of their robots and to the fleet's; never blocks, never waits."""
        fleet = self._logs.get(None)
        touched: set[FeedLog] = set()
        for row in rows:
            log = self._logs.get(row.record.serial_number)
            if log is None and fleet is None:
                continue
            # Serialized once, whatever the number of streams that send it.
            event = status_event(row)
            for target in (log, fleet):
                if target is not None:
                    target.events.append(event)
                    touched.add(target)
        for log in touched:
            log.flush()

    def publish_rejected(self, rejection: Rejection, received_at: datetime) -> None:
        """Tell the fleet streams a status was refused; costs nothing while none is open."""
        fleet = self._logs.get(None)
        if fleet is None:
            return
        fleet.events.append(FeedEvent.of("rejected", None, dumps(rejection.event(received_at))))
        fleet.flush()

    def _streams(self) -> list[FeedStream]:
        return [stream for log in self._logs.values() for stream in log.streams]

    def publish_event(self, serial_number: str | None, event: str, data: object) -> None:
        """Send an event without a row id (presence, alert) to the fleet streams and, with a serial, to that
        robot's streams; never blocks."""
        keys = (None,) if serial_number is None else (None, serial_number)
        targets = [log for key in keys if (log := self._logs.get(key)) is not None]
        if not targets:
            return
        encoded = FeedEvent.of(event, None, dumps(data))
        for log in targets:
            log.events.append(encoded)
            log.flush()

    def close_all(self) -> None:
        """End every stream after what its log holds, for shutdown."""
        for stream in self._streams():
            stream.close()

    async def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """End every stream; cut the connections of those whose clients have not taken the rest within `grace_s`."""
        self.close_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        stuck = self._streams()
        if stuck:
            logger.info("cutting %d feed connections whose clients did not read to the end", len(stuck))
        for stream in stuck:
            stream.abort()


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
        """Send the missed rows, a page (one write) at a time; False when `stream` closed before the last one."""
        while self._page:
            # Released as it is sent: an open feed holds no replay page once it streams live rows.
            page, self._page = self._page, []
            self.last_id = page[-1].id
            await _write(response, b"".join(status_event(row).wire for row in page))
            if len(page) < REPLAY_PAGE:
                break
            del page
            # Overflowed, shut down or left: no point reading on (a short last page, though, completes the replay).
            if stream.closed:
                return False
            await self.fetch()
        return True


async def _write(response: EventSourceResponse, data: bytes) -> None:
    """Write to the client; a client that takes nothing for SEND_TIMEOUT_S has its connection aborted."""
    async with asyncio.timeout(SEND_TIMEOUT_S):
        await response.write(data)


def _bound_send_buffer(request: web.Request) -> None:
    """Cap the kernel's send buffer of a feed's socket (Linux would grow it to 4 MiB per stream): a client that
    stops reading is then blocked on, and cut off for overflow, after about SEND_BUFFER bytes, not megabytes."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


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
    async with sse_response(request, ping_interval=ping_interval, send_timeout=SEND_TIMEOUT_S) as response:
        stream.transport = request.transport
        _bound_send_buffer(request)
        # The ping task ends when the client goes away; end the stream with it.
        gone = asyncio.create_task(response.wait(), name=f"sse-wait-{stream.name}")
        gone.add_done_callback(lambda _: stream.close())
        try:
            complete = replay is None or await replay.send(response, stream)
            last_id = replay.last_id if replay is not None else 0
            while (events := await stream.next_batch()) is not None:
                # Cut short (overflow, shutdown), the replay left a gap before the live rows: send none of them.
                if not complete or last_id:
                    events = [e for e in events if e.id is None or (complete and e.id > last_id)]
                # Everything pending in one write.
                if events:
                    await _write(response, b"".join(event.wire for event in events))
        except ConnectionResetError:
            logger.debug("feed client of %s went away", stream.name)
        except TimeoutError:
            # A graceful end would wait on the same full buffer: cut the connection.
            logger.info("feed client of %s took nothing for %.0f s; connection cut", stream.name, SEND_TIMEOUT_S)
            stream.abort()
        except StorageError as exc:
            # The client resumes from the last row it got, once storage is back.
            logger.warning("feed of %s ended: replay failed: %s", stream.name, exc)
        finally:
            gone.cancel()
    return response
