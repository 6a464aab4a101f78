"""A cheap MQTT load generator for `spotbox bench`: pre-framed packets, a window in flight per robot.

A general client library costs more per message than the broker under test (a paho-mqtt client tops out at
about 7,000 to 12,000 QoS 1 messages a second on one core, measured during development), so the bench
writes PUBLISH packets itself and reads only the acknowledgements: MQTT 3.1.1 or 5.0, QoS 0, 1 or 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import orjson

from spotbox.mqtt import codec311
from spotbox.mqtt.framing import encode_length, fixed_header, frame

# Protocol level byte of CONNECT, by the version names the CLI takes.
PROTOCOL_LEVELS = {"3.1.1": 4, "5": 5}

CONNACK, PUBACK, PUBREC, PUBCOMP = 0x20, 0x40, 0x50, 0x70


# The packet encoders are the broker's own (spotbox.mqtt): these names stay for the tests that import them.
remaining_length = encode_length
mqtt_string = codec311.encode_string


def connect_packet(
    client_id: str,
    *,
    clean: bool = True,
    version: str = "3.1.1",
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT, keep-alive 60 s, a clean session unless `clean` is false; MQTT 5 with no properties."""
    if version == "3.1.1":
        return codec311.connect(client_id, clean_session=clean, username=username, password=password)
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    # MQTT 5 CONNECT: the 3.1.1 layout with an (empty) properties field after the keep alive.
    body = mqtt_string("MQTT") + bytes([PROTOCOL_LEVELS[version], flags, 0, 60, 0]) + mqtt_string(client_id)
    for credential in (username, password):
        if credential is not None:
            body += mqtt_string(credential)
    return frame(0x10, body)


def publish_packet(
    topic: bytes, packet_id: int, payload: bytes, qos: int, *, dup: bool = False, version: str = "3.1.1"
) -> bytes:
    """PUBLISH with a 2-byte-length topic already encoded; `dup` marks a resend; MQTT 5 with no properties."""
    properties = b"\x00" if version == "5" else b""
    body = b"".join((topic, struct.pack("!H", packet_id) if qos else b"", properties, payload))
    return frame(0x30 | (dup << 3) | (qos << 1), body)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next packet from the broker: its first byte (type and flags) and its body."""
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, await reader.readexactly(length)


@dataclass(frozen=True)
class Load:
    """What the robots send: how many, how fast, at which QoS and protocol version."""

    robots: int
    messages: int
    window: int = 10
    rate: float | None = None
    qos: int = 1
    version: str = "3.1.1"
    # Encode every PUBLISH before the start, so the publishers cost next to nothing while the clock runs.
    pre_encoded: bool = False


@dataclass
class LoadResult:
    """What the publishers saw."""

    sent: int = 0
    acked: int = 0
    first_send: float = 0.0
    last_send: float = 0.0
    last_ack: float = 0.0
    errors: list[str] = field(default_factory=list)
    # (send time, publish-to-acknowledgement seconds) of each acknowledged publish; when each robot had its CONNACK.
    ack_latencies: list[tuple[float, float]] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    # When the first robot started publishing: every robot's phase counts from it.
    epoch: float = 0.0


def status_payload(n: int, robot: int = 0) -> bytes:
    """A valid robot status (the `n`th of robot number `robot`) whose `timestamp` is now, so a reader can compute
    publish-to-delivery latency.

    The battery level runs through 1 to 100, starting where the robot's number puts it: a fleet's robots are not
    charged in step, so each one's battery alert opens and clears at its own moment, not all 10,000 in one
    second."""
    return orjson.dumps(
        {
            "battery_level": 1 + (n + robot) % 100,
            "battery_status": "DISCHARGING",
            "driving_status": "IDLE",
            "current_drive_id": None,
            "location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0},
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
    )


# TCP connects a load generator has in flight at once: 10,000 robots opening their sockets in one go would keep
# this one process busy for seconds before the first of them sends its CONNECT (long enough for the broker's
# CONNECT deadline), where a real fleet's robots each open their own.
CONNECTS_IN_FLIGHT = 100


class _Robot(asyncio.Protocol):
    """One robot's connection: it sends its statuses from callbacks (a timer when paced, an acknowledgement when
    its window was full) and reads acknowledgements in `data_received`.

    No task, stream or semaphore per robot: with 10,000 robots on one core the generator must cost less per status
    than the broker it measures (the streams version cost about 180 us a status, more than spotbox's server).
    """

    def __init__(self, load: Load, index: int, messages: int, result: LoadResult) -> None:
        self.load, self.messages, self.result = load, messages, result
        self.serial = f"BENCH-{index:04d}"
        self.topic = mqtt_string(f"robot/{self.serial}/status")
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.connack: asyncio.Future[bytes] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.packets: list[bytes] | None = None
        self.sent = self.acked = self.in_flight = 0
        self.sent_at: dict[int, float] = {}
        self.interval = load.robots / load.rate if load.rate else None
        self.next_at = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False

    # --- the connection -----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"{self.serial}: the broker closed the connection ({exc or 'EOF'})")
        for future in (self.connack, self.done):
            if not future.done():
                future.set_exception(error)
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send_due()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        now = time.perf_counter()
        start = 0
        while (header := fixed_header(buffer, start)) is not None:
            first, length, header_len = header
            end = start + header_len + length
            if end > len(buffer):
                break
            body = bytes(buffer[start + header_len : end])
            start = end
            self._packet(first & 0xF0, body, now)
        del buffer[:start]

    def _packet(self, kind: int, body: bytes, now: float) -> None:
        if not self.connack.done():
            if kind != CONNACK:
                self.connack.set_exception(ConnectionError(f"{self.serial}: expected CONNACK, got type {kind >> 4}"))
            else:
                self.connack.set_result(body)
            return
        if kind == PUBREC:
            assert self.transport is not None
            self.transport.write(codec311.pubrel(int.from_bytes(body[:2])))
            return
        if kind != (PUBACK if self.load.qos == 1 else PUBCOMP):
            self._fail(ConnectionError(f"expected an acknowledgement, got packet type {kind >> 4}"))
            return
        # MQTT 5 acknowledgements may carry a reason code: 0x80 and above is a refusal.
        if len(body) > 2 and body[2] >= 0x80:
            self.result.errors.append(f"packet {struct.unpack('!H', body[:2])[0]} refused: reason {body[2]:#04x}")
        self.acked += 1
        self.in_flight -= 1
        result = self.result
        result.acked += 1
        result.last_ack = now
        sent = self.sent_at.pop(int.from_bytes(body[:2]), None)
        if sent is not None:
            result.ack_latencies.append((sent, now - sent))
        if self.acked >= self.messages:
            if not self.done.done():
                self.done.set_result(None)
        else:
            self._send_due()

    def _fail(self, error: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        assert self.transport is not None
        self.transport.abort()

    # --- sending ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin publishing: a paced robot at its own phase of the interval, as robots that are not synchronised."""
        load = self.load
        if load.pre_encoded:
            self.packets = [
                publish_packet(self.topic, n % 65535 + 1, status_payload(n, self.index), load.qos, version=load.version)
                for n in range(self.messages)
            ]
        # Phases count from one moment for all: counted from each robot's own start, which comes a little later
        # for each (10,000 robots take about 0.25 s to start), they spread over 1.25 intervals, and the first
        # quarter of every second carried 20% more statuses than the others.
        if not self.result.epoch:
            self.result.epoch = time.perf_counter()
        self.next_at = self.result.epoch + (
            self.interval * self.index / load.robots if self.interval is not None else 0.0
        )
        self._send_due()

    def _send_due(self) -> None:
        """Send every status that is due while the window and the socket have room; then wait for a timer (paced),
        an acknowledgement (window full) or `resume_writing`.

        One timer at most is pending: an acknowledgement that comes back before the next send time leaves the
        pending timer to it, where scheduling another each time made m*m/2 wake-ups for m messages."""
        load, result, transport = self.load, self.result, self.transport
        assert transport is not None
        window = load.window if load.qos else None
        while self.sent < self.messages and not self.paused:
            if window is not None and self.in_flight >= window:
                return  # an acknowledgement calls again
            now = time.perf_counter()
            if self.interval is not None:
                if now < self.next_at:
                    if self.timer is None:
                        self.timer = self.loop.call_at(self.loop.time() + (self.next_at - now), self._timer_fired)
                    return
                self.next_at += self.interval
            n = self.sent
            if not result.first_send:
                result.first_send = now
            transport.write(
                self.packets[n] if self.packets is not None else _status_packet(self.topic, n, self.index, load)
            )
            self.sent_at[n % 65535 + 1] = now
            self.sent += 1
            result.sent += 1
            if load.qos:
                self.in_flight += 1
        if self.sent >= self.messages and not self.done.done():
            result.last_send = time.perf_counter()
            if not load.qos:
                # QoS 0: done once everything is handed to the kernel; with a high-water mark of 0 the transport
                # pauses us until its buffer is empty, and `resume_writing` comes back here.
                transport.set_write_buffer_limits(high=0)
                if not self.paused:
                    self.done.set_result(None)

    def _timer_fired(self) -> None:
        self.timer = None
        self._send_due()


def _status_packet(topic: bytes, n: int, robot: int, load: Load) -> bytes:
    return publish_packet(topic, n % 65535 + 1, status_payload(n, robot), load.qos, version=load.version)


async def robot(
    host: str,
    port: int,
    index: int,
    messages: int,
    load: Load,
    connected: asyncio.Barrier,
    result: LoadResult,
    connecting: asyncio.Semaphore | None = None,
) -> None:
    """Robot `index`: connect (at most CONNECTS_IN_FLIGHT at once), wait until every robot is connected, then
    publish `messages` statuses with `load.window` unacknowledged at most, paced by `load.rate`."""
    loop = asyncio.get_running_loop()
    async with connecting or contextlib.nullcontext():
        transport, protocol = await loop.create_connection(lambda: _Robot(load, index, messages, result), host, port)
        try:
            transport.write(connect_packet(f"bench-{protocol.serial}", version=load.version))
            body = await protocol.connack
        except BaseException:
            transport.abort()
            raise
    try:
        if body[1] != 0:
            raise ConnectionError(f"{protocol.serial}: CONNECT (MQTT {load.version}) refused: {body.hex()}")
        result.connected_at.append(time.perf_counter())
        await connected.wait()
        protocol.start()
        await protocol.done
        transport.write(codec311.disconnect())
    finally:
        transport.close()


async def drive(
    host: str,
    port: int,
    load: Load,
    on_connected: Callable[[], None] | None = None,
    *,
    collect: bool = True,
) -> LoadResult:
    """Spread `load.messages` over `load.robots` connections; `load.rate` (total per second) paces them.

    `on_connected` is called once every robot has its CONNACK, before any publishes. With `collect` False the
    garbage collector is off while the load runs, for a generator in a process of its own (`spotbox bench`): its
    objects only grow (the latencies it records), and its collections (up to 85 ms at 10,000 robots) held its
    event loop while acknowledgements waited in its sockets, which the bench then counted as the server's latency.
    Tests that drive a server in their own process keep collecting, as the server would.
    """
    collecting = gc.isenabled()
    if not collect:
        gc.disable()
    try:
        return await _drive(host, port, load, on_connected)
    finally:
        if collecting:
            gc.enable()


async def _drive(host: str, port: int, load: Load, on_connected: Callable[[], None] | None) -> LoadResult:
    result = LoadResult()
    per_robot = [
        load.messages // load.robots + (1 if i < load.messages % load.robots else 0) for i in range(load.robots)
    ]
    counts = [count for count in per_robot if count]
    # The robots and this coroutine: it passes the barrier with the last robot to connect.
    connected = asyncio.Barrier(len(counts) + 1)
    connecting = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    async with asyncio.TaskGroup() as group:
        for i, count in enumerate(counts):
            group.create_task(robot(host, port, i, count, load, connected, result, connecting))
        await connected.wait()
        if on_connected is not None:
            on_connected()
    return result
