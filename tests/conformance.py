"""Shared by the conformance and attack tests (issues 10 and 11): settings the engine may not have yet, /metrics
samples, and one bare-socket client per protocol version behind the same few calls, so one test body observes the
wire of MQTT 3.1.1 and MQTT 5.0 alike.

Settings these tests expect of the broker engine (a test needing one that `Settings` lacks is an expected failure):
`max_queued` (offline queue per session, default 1,000), `receive_maximum` (announced in CONNACK, default 100),
`max_keepalive` (MQTT 5 Server Keep Alive), `connect_timeout_s` (CONNECT deadline), `max_pending_logins` (connections
still logging in, apart from `max_connections`), `max_outbound_bytes` (per-client outbound byte budget),
`max_inflight_bytes` (bytes held for incoming QoS 2 messages awaiting PUBREL, all sessions together).
Metric: `spotbox_mqtt_messages_dropped_total{reason}`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import mqtt5
import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.mqtt5_clients import Wire, wire_client
from tests.raw_mqtt import (
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    Publish,
    RawClient,
    Will,
    ack,
    publish,
    raw_session,
    subscribe,
)

VERSIONS = ["3.1.1", "5"]
DROPPED = "spotbox_mqtt_messages_dropped"  # the parser strips the counter's _total
P = TypeVar("P")


def settings_with(tmp_path: Path, **options: Any) -> Settings:
    """Settings of a test spotbox on SQLite with `options`; an expected failure while Settings lacks one of them."""
    known = {field.name for field in dataclasses.fields(Settings) if field.init}
    missing = sorted(set(options) - known)
    if missing:
        pytest.xfail(f"Settings has no {', '.join(missing)} yet (issues 10/11)")
    return Settings(
        http_port=0,
        mqtt_port=0,
        database_url=f"sqlite:///{tmp_path / 'x.db'}",
        batch_wait_ms=1.0,
        **options,
    )


async def metric(box: Box, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of the metric family `name` in /metrics, by its sorted labels."""
    async with box.http.get(f"{box.base_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


@dataclass(frozen=True)
class Delivery:
    """A PUBLISH the server sent, whatever the protocol version (`v5` holds the MQTT 5 packet with its properties)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    v5: mqtt5.PublishPacket | None = None


class Peer:
    """One bare-socket MQTT client of either version: subscribe, publish (whole handshake), receive, acknowledge.

    PUBLISHes that arrive while it waits for an acknowledgement (the server may interleave them) are kept, in
    order, for `next`.
    """

    def __init__(self, version: str, wire: Wire | None = None, raw: RawClient | None = None) -> None:
        self.version = version
        self.wire = wire
        self.raw = raw
        self.pending: collections.deque[Delivery] = collections.deque()
        self.unexpected: object = None  # what broke a silence, for the assertion message
        self._ids = itertools.count(1)

    async def send(self, *packets: bytes | mqtt5.Packet) -> None:
        """Packets (raw bytes, or mqtt5 packets on MQTT 5) on the connection."""
        if self.wire is not None:
            await self.wire.send(*packets)
            return
        assert self.raw is not None
        for data in packets:
            assert isinstance(data, bytes)
            self.raw.writer.write(data)
        await self.raw.writer.drain()

    async def disconnect(self) -> None:
        """A normal DISCONNECT (the will is discarded)."""
        await self.send(mqtt5.DisconnectPacket() if self.wire is not None else b"\xe0\x00")

    async def sync(self) -> None:
        """A PINGREQ/PINGRESP round trip: the server has read everything sent before it."""
        await self.send(b"\xc0\x00")
        if self.wire is not None:
            await self.expect(mqtt5.PingRespPacket)
        else:
            assert await self.expect(tuple) == (0xD0, b"")

    async def replies(self, data: bytes, expect: int, grace: float = 0.5) -> list[tuple[int, bytes]]:
        """Send `data` and a PINGREQ; every packet but PUBLISHes (kept for `next`) the server sends until both its
        PINGRESP and a packet starting with `expect` came, or `grace` seconds after the PINGRESP, as (first byte,
        body): replies to different packets may come in any order."""
        await self.send(data + b"\xc0\x00")
        replies: list[tuple[int, bytes]] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10) as deadline:
                while True:
                    packet = await self._receive()
                    if isinstance(packet, Delivery):
                        self.pending.append(packet)
                        continue
                    assert packet is not None, "closed by the server"
                    raw = packet if isinstance(packet, tuple) else self._framed(packet.write())
                    replies.append(raw)
                    if {0xD0, expect} <= {first for first, _ in replies}:
                        return replies
                    if raw[0] == 0xD0:
                        deadline.reschedule(asyncio.get_running_loop().time() + grace)
        return replies

    @staticmethod
    def _framed(data: bytes) -> tuple[int, bytes]:
        """(first byte, body) of one encoded packet."""
        index = 1
        while data[index] & 0x80:
            index += 1
        return data[0], data[index + 1 :]

    async def _receive(self) -> Delivery | mqtt5.Packet | tuple[int, bytes] | None:
        """The next packet: a Delivery for a PUBLISH; else the mqtt5 packet, or (first byte, body) on 3.1.1."""
        if self.wire is not None:
            packet = await self.wire.receive()
            if isinstance(packet, mqtt5.PublishPacket):
                return Delivery(
                    packet.topic,
                    packet.payload,
                    int(packet.qos),
                    packet.retain,
                    packet.duplicate,
                    packet.packet_id,
                    packet,
                )
            return packet
        assert self.raw is not None
        async with asyncio.timeout(10):
            first, body = await self.raw.read_packet()
        if first >> 4 == 3:
            p = Publish.decode(first, body)
            return Delivery(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id)
        return first, body

    async def expect(self, kind: type[P]) -> P:
        """The next packet other than a PUBLISH (those are kept for `next`), which must be of type `kind`."""
        while isinstance(packet := await self._receive(), Delivery):
            self.pending.append(packet)
        assert isinstance(packet, kind), f"expected {kind.__name__}, got {packet!r}"
        return packet

    async def _expect311(self, first: int) -> bytes:
        """The body of the next 3.1.1 packet other than a PUBLISH, which must start with `first`."""
        got, body = await self.expect(tuple)
        assert got == first, f"expected first byte {first:#x}, got {got:#x} {body!r}"
        return bytes(body)

    async def next_ack(self) -> tuple[int, int]:
        """The next PUBACK, PUBREC, PUBREL or PUBCOMP: (its first byte, its packet id)."""
        if self.wire is not None:
            while isinstance(packet := await self._receive(), Delivery):
                self.pending.append(packet)
            match packet:
                case mqtt5.PubAckPacket():
                    return PUBACK, packet.packet_id
                case mqtt5.PubRecPacket():
                    return PUBREC, packet.packet_id
                case mqtt5.PubRelPacket():
                    return PUBREL, packet.packet_id
                case mqtt5.PubCompPacket():
                    return PUBCOMP, packet.packet_id
            raise AssertionError(f"expected an acknowledgement, got {packet!r}")
        first, body = await self.expect(tuple)
        return first, int.from_bytes(body[:2], "big")

    async def subscribe(self, *filters: tuple[str, int], sub_id: int | None = None, **options: Any) -> list[int]:
        """SUBSCRIBE (MQTT 5: Retain As Published off unless in `options`) and return the SUBACK codes."""
        packet_id = next(self._ids)
        if self.wire is not None:
            options.setdefault("retain_as_published", False)
            topic_filters = [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS(q), **options) for f, q in filters]
            await self.wire.send(mqtt5.SubscribePacket(packet_id, topic_filters, subscription_id=sub_id))
            suback = await self.expect(mqtt5.SubAckPacket)
            return [int(code) for code in suback.reason_codes]
        assert sub_id is None
        assert not options
        await self.send(subscribe(packet_id, *filters))
        return list((await self._expect311(SUBACK))[2:])

    async def publish(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False, **props: Any) -> int:
        """PUBLISH and complete its handshake; the PUBACK/PUBREC reason code (0 for QoS 0 and for 3.1.1; 0x10, No
        matching subscribers, is a success and answered as 0 too)."""
        packet_id = next(self._ids) if qos else None
        if self.wire is not None:
            packet = mqtt5.PublishPacket(
                topic, payload, qos=mqtt5.QoS(qos), packet_id=packet_id, retain=retain, **props
            )
            await self.wire.send(packet)
            if qos == 1:
                code = int((await self.expect(mqtt5.PubAckPacket)).reason_code)
                return 0 if code == 0x10 else code
            if qos == 2:
                code = int((await self.expect(mqtt5.PubRecPacket)).reason_code)
                if code < 0x80:
                    await self.wire.send(mqtt5.PubRelPacket(packet_id or 0))
                    await self.expect(mqtt5.PubCompPacket)
                return 0 if code == 0x10 else code
            return 0
        assert not props
        await self.send(publish(topic, payload, qos, packet_id or 0, retain=retain))
        if qos == 1:
            await self._expect311(PUBACK)
        elif qos == 2:
            await self._expect311(PUBREC)
            await self.send(ack(PUBREL, packet_id or 0))
            await self._expect311(PUBCOMP)
        return 0

    async def next(self) -> Delivery:
        """The next PUBLISH from the server (a kept one first); any other packet fails the test."""
        if self.pending:
            return self.pending.popleft()
        delivery = await self._receive()
        assert isinstance(delivery, Delivery), f"expected a PUBLISH, got {delivery!r}"
        return delivery

    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge a delivery completely (PUBACK; or PUBREC, the server's PUBREL, PUBCOMP)."""
        packet_id = delivery.packet_id
        if delivery.qos == 0 or packet_id is None:
            return
        if self.wire is not None:
            if delivery.qos == 1:
                await self.wire.send(mqtt5.PubAckPacket(packet_id))
                return
            await self.wire.send(mqtt5.PubRecPacket(packet_id))
            assert (await self.expect(mqtt5.PubRelPacket)).packet_id == packet_id
            await self.wire.send(mqtt5.PubCompPacket(packet_id))
            return
        if delivery.qos == 1:
            await self.send(ack(PUBACK, packet_id))
            return
        await self.send(ack(PUBREC, packet_id))
        assert await self._expect311(PUBREL) == packet_id.to_bytes(2, "big")
        await self.send(ack(PUBCOMP, packet_id))

    async def packets_until(self, marker: bytes = b"marker") -> list[Delivery | tuple[int, int]]:
        """Everything up to the PUBLISH carrying `marker` (excluded), acknowledging nothing: deliveries, and other
        packets as (first byte, packet id)."""
        seen: list[Delivery | tuple[int, int]] = list(self.pending)
        self.pending.clear()
        if any(isinstance(item, Delivery) and item.payload == marker for item in seen):
            return seen[: next(i for i, d in enumerate(seen) if isinstance(d, Delivery) and d.payload == marker)]
        while True:
            packet = await self._receive()
            if isinstance(packet, Delivery):
                if packet.payload == marker:
                    return seen
                seen.append(packet)
            elif isinstance(packet, tuple):
                seen.append((packet[0], int.from_bytes(packet[1][:2], "big")))
            else:
                assert packet is not None, "closed by the server"
                seen.append((packet.write()[0], getattr(packet, "packet_id", 0)))

    async def received(self, marker: bytes = b"marker") -> list[Delivery]:
        """Every delivery before the one carrying `marker` (each acknowledged)."""
        deliveries = []
        while (delivery := await self.next()).payload != marker:
            deliveries.append(delivery)
            await self.ack(delivery)
        await self.ack(delivery)
        return deliveries

    async def silent_for(self, seconds: float) -> bool:
        """True when nothing (kept or new) comes from the server for `seconds` and the connection stays open; a
        PUBLISH that does come is kept for `next`."""
        if self.pending:
            return False
        try:
            async with asyncio.timeout(seconds):
                packet = await self._receive()
        except TimeoutError:
            return True
        except asyncio.IncompleteReadError:
            return False
        if isinstance(packet, Delivery):
            self.pending.append(packet)
        self.unexpected = packet
        return False

    async def closed(self, seconds: float = 5.0) -> bytes:
        """Everything the server still sends until it closes the connection, which it must within `seconds`."""
        reader = self.raw.reader if self.raw is not None else self.wire.reader if self.wire is not None else None
        assert reader is not None
        data = b""
        async with asyncio.timeout(seconds):
            try:
                while chunk := await reader.read(65536):
                    data += chunk
            except ConnectionResetError:
                pass
        return data


@asynccontextmanager
async def peer(
    port: int,
    version: str,
    client_id: str | None = None,
    *,
    clean: bool = True,
    keep_alive: int = 60,
    will: tuple[str, bytes] | None = None,
    **v5: Any,
) -> AsyncIterator[tuple[Peer, bool]]:
    """A connected Peer and its CONNACK's session-present flag; a persistent MQTT 5 session expires after 300 s."""
    client_id = client_id or f"peer-{uuid.uuid4().hex[:8]}"
    if version == "5":
        if not clean:
            v5.setdefault("session_expiry_interval", 300)
        v5_will = mqtt5.Will(will[0], payload=will[1]) if will is not None else None
        async with wire_client(
            port, client_id=client_id, clean_start=clean, keep_alive=keep_alive, will=v5_will, **v5
        ) as (wire, connack):
            assert connack.reason_code == mqtt5.ConnAckReasonCode.SUCCESS, connack
            yield Peer(version, wire=wire), connack.session_present
    else:
        raw_will = Will(will[0], will[1]) if will is not None else None
        async with raw_session(port, client_id, clean=clean, keep_alive=keep_alive, will=raw_will) as (raw, present):
            yield Peer(version, raw=raw), present


async def start(make_box: BoxFactory, tmp_path: Path, **options: Any) -> Box:
    """spotbox on SQLite with `options` (see `settings_with`)."""
    return await make_box(settings_with(tmp_path, **options))
