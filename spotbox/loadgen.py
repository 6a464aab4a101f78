"""A cheap MQTT 3.1.1 QoS 1 load generator for `spotbox bench`: pre-framed packets, a window in flight.

A general client library costs more per message than the broker under test (see MEASURED.md), so the bench
writes PUBLISH packets itself and reads nothing but CONNACK and PUBACK.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(text: str) -> bytes:
    """A UTF-8 string field: 2-byte length, then the bytes."""
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, *, clean: bool = True) -> bytes:
    """CONNECT, MQTT 3.1.1, keep-alive 60 s, a clean session unless `clean` is false."""
    body = mqtt_string("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", 60) + mqtt_string(client_id)
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes, qos: int, *, dup: bool = False) -> bytes:
    """PUBLISH with a 2-byte-length topic already encoded; `dup` marks a resend."""
    body = topic + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (dup << 3) | (qos << 1)]) + _varint(len(body)) + body


@dataclass
class LoadResult:
    """What the publishers saw."""

    acked: int = 0
    first_send: float = 0.0
    last_ack: float = 0.0
    errors: list[str] = field(default_factory=list)


def status_payload(n: int) -> bytes:
    """A valid robot status whose `timestamp` is now, so a reader can compute publish-to-delivery latency."""
    return orjson.dumps(
        {
            "battery_level": 1 + n % 100,
            "battery_status": "DISCHARGING",
            "driving_status": "IDLE",
            "current_drive_id": None,
            "location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0},
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds"),
        }
    )


async def robot(
    host: str, port: int, serial: str, messages: int, window: int, interval: float | None, result: LoadResult
) -> None:
    """One robot connection publishing `messages` statuses at QoS 1, `window` unacknowledged at most."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet(f"bench-{serial}"))
    if await reader.readexactly(4) != b"\x20\x02\x00\x00":
        raise ConnectionError(f"{serial}: CONNECT refused")
    topic = mqtt_string(f"robot/{serial}/status")
    slots = asyncio.Semaphore(window)

    async def read_acks() -> None:
        for _ in range(messages):
            header = await reader.readexactly(4)
            if header[0] != 0x40:
                raise ConnectionError(f"{serial}: expected PUBACK, got packet type {header[0] >> 4}")
            result.acked += 1
            result.last_ack = time.perf_counter()
            slots.release()

    acks = asyncio.create_task(read_acks(), name=f"acks-{serial}")
    next_at = time.perf_counter()
    try:
        for n in range(messages):
            await slots.acquire()
            if interval is not None:
                next_at += interval
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if not result.first_send:
                result.first_send = time.perf_counter()
            writer.write(publish_packet(topic, n % 65535 + 1, status_payload(n), 1))
            if n % window == 0:
                await writer.drain()
        await writer.drain()
        await acks
    finally:
        acks.cancel()
        writer.write(b"\xe0\x00")  # DISCONNECT
        writer.close()


async def drive(host: str, port: int, robots: int, messages: int, window: int, rate: float | None) -> LoadResult:
    """Spread `messages` over `robots` connections; `rate` (total per second) paces them, None goes flat out."""
    result = LoadResult()
    per_robot = [messages // robots + (1 if i < messages % robots else 0) for i in range(robots)]
    interval = robots / rate if rate else None
    async with asyncio.TaskGroup() as group:
        for i, count in enumerate(per_robot):
            if count:
                group.create_task(robot(host, port, f"BENCH-{i:04d}", count, window, interval, result))
    return result
