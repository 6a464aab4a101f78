"""A cheap MQTT load generator for `spotbox bench`: pre-framed packets, a window in flight per robot.

A general client library costs more per message than the broker under test (a paho-mqtt client tops out at
about 7,000 to 12,000 QoS 1 messages a second on one core, measured during development), so the bench
writes PUBLISH packets itself and reads only the acknowledgements: MQTT 3.1.1 or 5.0, QoS 0, 1 or 2.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

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


async def _read_acks(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    load: Load,
    messages: int,
    slots: asyncio.Semaphore,
    result: LoadResult,
    sent_at: dict[int, float],
) -> None:
    """Count PUBACKs (QoS 1) or answer PUBRECs and count PUBCOMPs (QoS 2), freeing a window slot for each."""
    done = 0
    buffer = bytearray()
    while done < messages:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("the broker closed the connection")
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
            kind = first & 0xF0
            if kind == PUBREC:
                writer.write(codec311.pubrel(int.from_bytes(body[:2])))
                continue
            if kind != (PUBACK if load.qos == 1 else PUBCOMP):
                raise ConnectionError(f"expected an acknowledgement, got packet type {kind >> 4}")
            # MQTT 5 acknowledgements may carry a reason code: 0x80 and above is a refusal.
            if len(body) > 2 and body[2] >= 0x80:
                result.errors.append(f"packet {struct.unpack('!H', body[:2])[0]} refused: reason {body[2]:#04x}")
            done += 1
            result.acked += 1
            slots.release()
            sent = sent_at.pop(int.from_bytes(body[:2]), None)
            if sent is not None:
                result.ack_latencies.append((sent, now - sent))
        del buffer[:start]
        result.last_ack = now


def _status_packet(topic: bytes, n: int, load: Load) -> bytes:
    return publish_packet(topic, n % 65535 + 1, status_payload(n), load.qos, version=load.version)


async def robot(
    host: str,
    port: int,
    index: int,
    messages: int,
    load: Load,
    connected: asyncio.Barrier,
    result: LoadResult,
) -> None:
    """Robot `index`: connect, wait until every robot is connected, then publish `messages` statuses with
    `load.window` unacknowledged at most; a paced robot starts at its own phase of the interval, as robots that
    are not synchronised would."""
    serial = f"BENCH-{index:04d}"
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(connect_packet(f"bench-{serial}", version=load.version))
    first, body = await read_packet(reader)
    if first != CONNACK or body[1] != 0:
        raise ConnectionError(f"{serial}: CONNECT (MQTT {load.version}) refused: {body.hex()}")
    result.connected_at.append(time.perf_counter())
    topic = mqtt_string(f"robot/{serial}/status")
    packets = (
        [
            publish_packet(topic, n % 65535 + 1, status_payload(n), load.qos, version=load.version)
            for n in range(messages)
        ]
        if load.pre_encoded
        else None
    )
    await connected.wait()
    slots = asyncio.Semaphore(load.window)
    interval = load.robots / load.rate if load.rate else None
    acks = None
    sent_at: dict[int, float] = {}
    if load.qos:
        acks = asyncio.create_task(
            _read_acks(reader, writer, load, messages, slots, result, sent_at), name=f"acks-{serial}"
        )
    # When this robot publishes next; paced robots start at their own phase of the interval.
    next_at = time.perf_counter() + (interval * index / load.robots if interval else 0.0)
    try:
        for n in range(messages):
            if load.qos:
                await slots.acquire()
            if interval is not None:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at += interval
            if not result.first_send:
                result.first_send = time.perf_counter()
            writer.write(packets[n] if packets is not None else _status_packet(topic, n, load))
            sent_at[n % 65535 + 1] = time.perf_counter()
            result.sent += 1
            if n % load.window == 0:
                await writer.drain()
        await writer.drain()
        result.last_send = time.perf_counter()
        if acks is not None:
            await acks
    finally:
        if acks is not None:
            acks.cancel()
        writer.write(codec311.disconnect())
        writer.close()


async def drive(host: str, port: int, load: Load) -> LoadResult:
    """Spread `load.messages` over `load.robots` connections; `load.rate` (total per second) paces them."""
    result = LoadResult()
    per_robot = [
        load.messages // load.robots + (1 if i < load.messages % load.robots else 0) for i in range(load.robots)
    ]
    counts = [count for count in per_robot if count]
    connected = asyncio.Barrier(len(counts))
    async with asyncio.TaskGroup() as group:
        for i, count in enumerate(counts):
            group.create_task(robot(host, port, i, count, load, connected, result))
    return result
