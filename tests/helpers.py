"""What the tests use to talk to spotbox like a robot, an operator or a browser would."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import struct
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import aiomqtt
import orjson

from spotbox.cli import collect_less
from spotbox.loadgen import connect_packet, mqtt_string, publish_packet
from spotbox.users import User, make_user

VERSIONS = {"3.1.1": aiomqtt.ProtocolVersion.V311, "5": aiomqtt.ProtocolVersion.V5}

VALID_STATUS: dict[str, Any] = {
    "battery_level": 80,
    "battery_status": "DISCHARGING",
    "driving_status": "MOVING",
    "current_drive_id": "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10",
    "location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0},
    "timestamp": "2026-11-22T10:00:00Z",
}


def status(**changes: Any) -> dict[str, Any]:
    """A valid status with `changes` applied; a value of `...` removes the field."""
    doc = copy.deepcopy(VALID_STATUS)
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def payload(**changes: Any) -> bytes:
    """`status(**changes)` encoded as JSON."""
    return orjson.dumps(status(**changes))


def stamp(n: int) -> str:
    """A distinct, increasing timestamp for the n-th message of a test."""
    return f"2026-11-22T10:{n // 60:02d}:{n % 60:02d}Z"


@asynccontextmanager
async def mqtt_client(
    port: int, version: str = "3.1.1", *, transport: str = "tcp", path: str | None = None, **kwargs: Any
) -> AsyncIterator[aiomqtt.Client]:
    """A connected aiomqtt (paho) client of the given protocol version."""
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=kwargs.pop("identifier", f"test-{uuid.uuid4().hex[:10]}"),
        protocol=VERSIONS[version],
        transport=transport,  # type: ignore[arg-type]
        websocket_path=path,
        timeout=kwargs.pop("timeout", 10),
        **kwargs,
    )
    async with client:
        yield client


@dataclass
class SseEvent:
    """One parsed Server-Sent Event."""

    event: str
    id: str | None
    data: str

    def json(self) -> Any:
        return orjson.loads(self.data)


# The operations events (issue 13) that tests of statuses and rejections do not look at.
OPS_EVENTS = ("presence", "alert")


class FeedReader:
    """Reads SSE events from an open feed response, skipping the event types in `skip`."""

    def __init__(self, response: aiohttp.ClientResponse, skip: tuple[str, ...] = OPS_EVENTS) -> None:
        self.response = response
        self.skip = skip

    async def next(self) -> SseEvent:
        """The next event not skipped (pings and comments skipped too)."""
        while True:
            event = await self._next()
            if event.event not in self.skip:
                return event

    async def _next(self) -> SseEvent:
        fields: dict[str, str] = {}
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError("feed closed")
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "data" in fields:
                    return SseEvent(fields.get("event", "message"), fields.get("id"), fields["data"])
                fields.clear()
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


@asynccontextmanager
async def open_feed(
    http: aiohttp.ClientSession, url: str, headers: Mapping[str, str] | None = None, skip: tuple[str, ...] = OPS_EVENTS
) -> AsyncIterator[FeedReader]:
    """Subscribe to a feed (resuming with a `Last-Event-ID` header, say); once this returns, the stream is live."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with http.get(url, headers=headers, timeout=timeout) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield FeedReader(response, skip)


T0 = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)


def nth_status(n: int) -> bytes:
    """The n-th status: a unique timestamp identifies it in the history."""
    ts = (T0 + timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z")
    return orjson.dumps(
        {
            "battery_level": 50,
            "battery_status": "DISCHARGING",
            "driving_status": "IDLE",
            "location": {"latitude": 1.0, "longitude": 2.0, "height": 3.0},
            "timestamp": ts,
        }
    )


class RawPublisher:
    """An MQTT 3.1.1 publisher on a bare socket, for what client libraries hide: DUP flags, packet ids, pipelining."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serial: str) -> None:
        self.reader = reader
        self.writer = writer
        self.topic = mqtt_string(f"robot/{serial}/status")

    async def publish(self, packet_id: int, body: bytes, *, dup: bool = False, qos: int = 1) -> None:
        """Write one PUBLISH of `body` to the robot's status topic."""
        self.writer.write(publish_packet(self.topic, packet_id, body, qos, dup=dup))
        await self.writer.drain()

    async def publish_many(self, numbers: range) -> None:
        """Write one QoS 1 PUBLISH per number (the status `nth_status(n)`, packet id n + 1) without waiting."""
        for n in numbers:
            self.writer.write(publish_packet(self.topic, n + 1, nth_status(n), 1))
        await self.writer.drain()

    async def acked_ids(self, count: int) -> set[int]:
        """Read `count` PUBACKs; the packet ids they acknowledge."""
        ids: set[int] = set()
        for _ in range(count):
            header = await self.reader.readexactly(4)
            assert header[:2] == b"\x40\x02", header
            ids.add(struct.unpack("!H", header[2:])[0])
        return ids


@asynccontextmanager
async def raw_publisher(
    port: int, serial: str, *, client_id: str | None = None, clean: bool = True
) -> AsyncIterator[RawPublisher]:
    """A connected RawPublisher, disconnected at the end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(client_id or f"raw-{serial}", clean=clean))
    assert (await reader.readexactly(4))[::3] == b"\x20\x00", "CONNECT refused"
    try:
        yield RawPublisher(reader, writer, serial)
    finally:
        writer.write(b"\xe0\x00")
        writer.close()


@contextmanager
def collector_as_spotbox_run() -> Iterator[None]:
    """The garbage collector as `spotbox run` sets it (`collect_less`), for a test that measures CPU or latency in
    this process; pytest's own heap is frozen meanwhile, so that full collections walk spotbox's objects only.

    With CPython's defaults, young collections came every 700 objects: parsing 1 MiB of nested arrays took 0.43 s
    instead of 0.08 s, and opening 300 feeds set off full collections of pytest's whole heap.
    """
    thresholds = gc.get_threshold()
    collect_less()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def known_user(
    name: str, password: str, publish: Iterable[str] = (), subscribe: Iterable[str] = (), *, manage: bool = False
) -> User:
    """`make_user`, hashed once per test process for the same arguments.

    An argon2 hash costs about 20 ms of CPU by design, and the users files of the tests were hashed over 400 times a
    run, the same few users each time. The hash is real (what `spotbox users add` writes) and every login still
    checks a password against it; tests of hashing itself call `make_user`.
    """
    return _known_user(name, password, tuple(publish), tuple(subscribe), manage)


@functools.cache
def _known_user(name: str, password: str, publish: tuple[str, ...], subscribe: tuple[str, ...], manage: bool) -> User:
    return make_user(name, password, publish, subscribe, manage=manage)
