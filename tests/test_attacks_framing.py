"""Malformed and out-of-order packets end their connection and smuggle nothing through (issue 11, item 6, and the
classes of attack around it): a packet hidden in the payload of a refused PUBLISH is never delivered or stored; MQTT
5 clients get a DISCONNECT with the reason first; the broker logs one line, not a traceback."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import mqtt5
import pytest

from spotbox.loadgen import mqtt_string
from spotbox.mqtt.broker import CLIENT_ID_MAX_BYTES
from spotbox.mqtt.framing import encode_length
from spotbox.mqtt.wire import USER_PROPERTIES_MAX
from tests.conformance import Peer, peer, start
from tests.conftest import Box, BoxFactory
from tests.helpers import payload, stamp
from tests.raw_mqtt import Will, connect_packet, packet, raw_client, subscribe_packet

MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID, TOPIC_ALIAS_INVALID, QUOTA_EXCEEDED = 0x81, 0x82, 0x90, 0x94, 0x97
HIDDEN = packet(0x30, mqtt_string("sm/hidden") + b"smuggled") + packet(
    0x30, mqtt_string("robot/SMUG/status") + payload(timestamp=stamp(1))
)


def publish311(first: int, topic: bytes, body: bytes, packet_id: int | None = 1) -> bytes:
    """A 3.1.1 PUBLISH with any first byte and a raw topic."""
    return packet(first, mqtt_string(topic) + (struct.pack("!H", packet_id) if packet_id is not None else b"") + body)


def publish5(first: int, topic: bytes, body: bytes, properties: bytes = b"") -> bytes:
    """An MQTT 5 PUBLISH (QoS 1, packet id 1 when the first byte says so) with raw topic and properties."""
    packet_id = struct.pack("!H", 1) if first & 0x06 else b""
    return packet(first, mqtt_string(topic) + packet_id + encode_length(len(properties)) + properties + body)


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite."""
    return await start(make_box, tmp_path)


async def nothing_routed(box: Box, watcher: Peer) -> None:
    """A marker published now is the first thing the watcher (subscribed to #) gets, and nothing was stored."""
    async with peer(box.mqtt_port, "3.1.1") as (publisher, _):
        await publisher.publish("zz/marker", b"marker", 1)
    assert [(d.topic, d.payload) for d in await watcher.received()] == []
    assert await box.history("SMUG") == []


async def server_answer(box: Box, data: bytes, *, version: str = "3.1.1", connect: bool = True) -> list[int]:
    """Send `data` (after an accepted CONNECT when `connect`), then a PINGREQ; the first bytes of the packets the
    server sent after the CONNACK until it closed the connection, which it must within 5 s (a PINGRESP, the sign of
    a connection still read, ends the list); MQTT 5 DISCONNECTs as 0xE0 and their reason code."""
    async with raw_client(box.mqtt_port) as client:
        if connect:
            await client.send(connect_packet("attacker") if version == "3.1.1" else mqtt5.ConnectPacket("a").write())
            async with asyncio.timeout(5):
                first, body = await client.read_packet()
            assert (first, body[-1] if version == "3.1.1" else body[1]) == (0x20, 0), body
        try:
            await client.send(data + b"\xc0\x00")
        except ConnectionError:
            return []  # closed before it read everything: fine
        answers = await client.answers_until_closed(5)
    return [code for first, body in answers for code in ([first, body[0]] if first == 0xE0 and body else [first])]


SMUGGLERS = {
    "wildcard-topic": (0x30, b"sm/+"),
    "multi-level-wildcard": (0x30, b"sm/#"),
    "nul-in-topic": (0x30, b"sm/\x00x"),
    "qos-3": (0x36, b"sm/x"),
    "empty-topic": (0x30, b""),
}


@pytest.mark.parametrize(
    ("version", "name"),
    [(v, n) for v in ("3.1.1", "5") for n in SMUGGLERS],
)
async def test_packet_hidden_in_a_refused_publish_is_never_routed(
    sbox: Box, name: str, version: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that a PUBLISH with a bad topic or QoS 3 whose payload holds two PUBLISHes ends the connection (MQTT 5:
    DISCONNECT 0x81, 0x82 or 0x90 first), and neither hidden PUBLISH is delivered or stored."""
    first, topic = SMUGGLERS[name]
    if version == "3.1.1":
        data = publish311(first, topic, HIDDEN, packet_id=None if first == 0x30 else 1)
    else:
        data = publish5(first, topic, HIDDEN)
    async with peer(sbox.mqtt_port, "5") as (watcher, _):
        assert await watcher.subscribe(("#", 1)) == [1]
        answer = await server_answer(sbox, data, version=version)
        if version == "5":
            assert answer[:1] == [0xE0]
            assert answer[1] in (MALFORMED, PROTOCOL_ERROR, TOPIC_NAME_INVALID), answer
        else:
            assert answer == []
        await nothing_routed(sbox, watcher)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info is not None]


CONNECTED_311 = {
    "remaining-length-5-bytes": b"\x30\xff\xff\xff\xff\x01",
    "second-connect": connect_packet("again"),
    "subscribe-reserved-flags": b"\x80" + subscribe_packet(b"\x00\x01" + mqtt_string("#") + b"\x01")[1:],
    "subscribe-reserved-qos-bits": subscribe_packet(b"\x00\x01" + mqtt_string("#") + b"\x41"),
    "subscribe-without-filters": subscribe_packet(b"\x00\x01"),
    "subscribe-nul-in-filter": subscribe_packet(b"\x00\x01" + mqtt_string("a\x00/#") + b"\x01"),
    "unsubscribe-reserved-flags": packet(0xA0, b"\x00\x01" + mqtt_string("#")),
    "pubrel-reserved-flags": packet(0x60, b"\x00\x01"),
    "qos1-packet-id-0": publish311(0x32, b"sm/x", b"id0", packet_id=0),
    "reserved-type-0": b"\x00\x00",
    "reserved-type-15": b"\xf0\x00",
    "connack-from-client": b"\x20\x02\x00\x00",
}


@pytest.mark.parametrize("name", list(CONNECTED_311))
async def test_malformed_packet_after_connect_ends_the_connection(sbox: Box, name: str) -> None:
    """Test that a malformed or forbidden 3.1.1 packet after CONNECT closes the connection without an answer, and
    nothing it carried is routed."""
    async with peer(sbox.mqtt_port, "5") as (watcher, _):
        assert await watcher.subscribe(("#", 1)) == [1]
        assert await server_answer(sbox, CONNECTED_311[name]) == []
        await nothing_routed(sbox, watcher)


CONNECT_311 = connect_packet("c")
BEFORE_CONNECT = {
    "publish-first": publish311(0x30, b"sm/x", b"first", packet_id=None),
    "subscribe-first": subscribe_packet(b"\x00\x01" + mqtt_string("#") + b"\x01"),
    "pingreq-first": b"\xc0\x00",
    "reserved-connect-flag": CONNECT_311[:9] + bytes([CONNECT_311[9] | 1]) + CONNECT_311[10:],
    "password-without-username": connect_packet("c")[:9] + b"\x42" + connect_packet("c")[10:] + mqtt_string("pw"),
    "protocol-name-mqtx": CONNECT_311.replace(b"MQTT", b"MQTX"),
    "will-qos-3": connect_packet("c", will=Will("sm/will", b"w", qos=3)),
    "will-qos-without-will-flag": CONNECT_311[:9] + bytes([CONNECT_311[9] | 0x08]) + CONNECT_311[10:],
    "will-topic-invalid-utf8": connect_packet("c", will=Will(b"sm/\xff\xfe", b"w")),
    "will-topic-wildcard": connect_packet("c", will=Will("sm/#", b"w")),
    "remaining-length-5-bytes": b"\x10\xff\xff\xff\xff\x01",
}


@pytest.mark.parametrize("name", list(BEFORE_CONNECT))
async def test_bad_first_packet_gets_no_session(sbox: Box, name: str) -> None:
    """Test that a packet before CONNECT, or a malformed CONNECT, is closed with no accepted CONNACK (at most a
    refusal), a good CONNECT after it is never read, and no will or message of it is ever routed."""
    async with peer(sbox.mqtt_port, "5") as (watcher, _):
        assert await watcher.subscribe(("#", 1)) == [1]
        async with raw_client(sbox.mqtt_port) as client:
            await client.send(BEFORE_CONNECT[name] + connect_packet("then-good") + b"\xc0\x00")
            answer = await client.answers_until_closed(0.7)
        assert answer in ([], [(0x20, b"\x00\x01")], [(0x20, b"\x00\x02")]), answer  # nothing, or a refusing CONNACK
        await nothing_routed(sbox, watcher)


async def test_empty_client_id_with_persistent_session_is_identifier_rejected(sbox: Box) -> None:
    """Test that a 3.1.1 CONNECT with a zero-length client id and clean session 0 gets CONNACK 0x02 and is closed."""
    async with raw_client(sbox.mqtt_port) as client:
        await client.send(connect_packet("", clean=False))
        assert await client.closed_within(5) == b"\x20\x02\x00\x02"


@pytest.mark.parametrize(
    "version",
    ["3.1.1", "5"],
)
async def test_pubrel_for_an_unknown_packet_id_is_completed(sbox: Box, version: str) -> None:
    """Test that a PUBREL for a packet id never received gets PUBCOMP (MQTT 5: 0x92 Packet Identifier not found),
    and the connection keeps working."""
    async with peer(sbox.mqtt_port, version) as (client, _):
        replies = await client.replies(b"\x62\x02\x01\x23", expect=0x70)
        pubcomps = [body for first, body in replies if first == 0x70]
        assert [body[:2] for body in pubcomps] == [b"\x01\x23"], replies
        if version == "5":
            assert pubcomps[0][2] == mqtt5.PubCompReasonCode.PACKET_ID_NOT_FOUND
        await client.publish("sm/after", b"still here", 1)


MQTT5_CONNECTED = {
    "topic-alias-65535": (publish5(0x32, b"sm/x", b"a", b"\x23\xff\xff"), {TOPIC_ALIAS_INVALID}),
    "empty-topic-without-alias": (publish5(0x32, b"", b"a"), {PROTOCOL_ERROR}),
    "subscription-identifier-0": (
        subscribe_packet(b"\x00\x01\x02\x0b\x00" + mqtt_string("#") + b"\x01"),
        {MALFORMED, PROTOCOL_ERROR},
    ),
    "subscription-identifier-in-publish": (publish5(0x32, b"sm/x", b"a", b"\x0b\x01"), {MALFORMED, PROTOCOL_ERROR}),
    "properties-overrun": (publish5(0x32, b"sm/x", b"", b"\x26\x00\x05ab"), {MALFORMED}),
    "second-connect": (mqtt5.ConnectPacket("again").write(), {PROTOCOL_ERROR}),
    "remaining-length-5-bytes": (b"\x30\xff\xff\xff\xff\x01", {MALFORMED}),
    # What the mqtt5 codec lets through (spotbox.mqtt.check5): a panic on bad UTF-8, the rest accepted.
    "topic-surrogate": (publish5(0x32, b"sm/\xed\xa0\x80", b"a"), {MALFORMED}),
    "topic-overlong-utf8": (publish5(0x32, b"sm\xc0\xafx", b"a"), {MALFORMED}),
    "user-property-surrogate": (
        publish5(0x32, b"sm/x", b"a", b"\x26" + mqtt_string(b"\xed\xa0\x80") + b"\0\0"),
        {MALFORMED},
    ),
    "user-property-nul": (publish5(0x32, b"sm/x", b"a", b"\x26" + mqtt_string("k\0") + b"\0\0"), {MALFORMED}),
    "content-type-nul": (publish5(0x32, b"sm/x", b"a", b"\x03" + mqtt_string("a\0")), {MALFORMED}),
    "response-topic-wildcard": (publish5(0x32, b"sm/x", b"a", b"\x08" + mqtt_string("r/#")), {MALFORMED}),
    "response-topic-empty": (publish5(0x32, b"sm/x", b"a", b"\x08\0\0"), {MALFORMED}),
    "payload-format-indicator-2": (publish5(0x32, b"sm/x", b"a", b"\x01\x02"), {MALFORMED}),
    "publish-packet-id-0": (packet(0x32, mqtt_string("sm/x") + b"\0\0\0a"), {MALFORMED}),
    "dup-at-qos-0": (publish5(0x38, b"sm/x", b"a"), {MALFORMED}),
    "puback-packet-id-0": (b"\x40\x02\x00\x00", {MALFORMED}),
    "subscribe-without-filters": (subscribe_packet(b"\x00\x01\x00"), {MALFORMED, PROTOCOL_ERROR}),
    "subscribe-packet-id-0": (subscribe_packet(b"\x00\x00\x00" + mqtt_string("#") + b"\x01"), {MALFORMED}),
    "subscribe-reserved-option-bits": (subscribe_packet(b"\x00\x01\x00" + mqtt_string("#") + b"\xc1"), {MALFORMED}),
    "subscribe-filter-surrogate": (
        subscribe_packet(b"\x00\x01\x00" + mqtt_string(b"\xed\xa0\x80") + b"\x01"),
        {MALFORMED},
    ),
    "unsubscribe-without-filters": (packet(0xA2, b"\x00\x01\x00"), {MALFORMED, PROTOCOL_ERROR}),
    # Each user property is encoded again for every subscriber: more than USER_PROPERTIES_MAX is refused.
    "too-many-user-properties": (
        publish5(0x32, b"sm/x", b"a", (b"\x26\0\0\0\0") * (USER_PROPERTIES_MAX + 1)),
        {QUOTA_EXCEEDED},
    ),
    "unsubscribe-packet-id-0": (packet(0xA2, b"\x00\x00\x00" + mqtt_string("#")), {MALFORMED}),
    # MQTT 5.0 3.3.2.3.4: a Topic Alias of 0 is invalid; a property that may appear once, twice, a Protocol Error.
    "topic-alias-0": (publish5(0x32, b"sm/x", b"a", b"\x23\0\0"), {TOPIC_ALIAS_INVALID}),
    "topic-alias-twice": (publish5(0x32, b"sm/x", b"a", b"\x23\0\1\x23\0\2"), {PROTOCOL_ERROR}),
}


@pytest.mark.parametrize("name", list(MQTT5_CONNECTED))
async def test_mqtt5_protocol_errors_get_their_disconnect_reason(sbox: Box, name: str) -> None:
    """Test that each MQTT 5 protocol error after CONNECT gets DISCONNECT with its reason code, then the connection
    closes and nothing it carried is routed."""
    data, codes = MQTT5_CONNECTED[name]
    async with peer(sbox.mqtt_port, "5") as (watcher, _):
        assert await watcher.subscribe(("#", 1)) == [1]
        answer = await server_answer(sbox, data, version="5")
        assert answer[:1] == [0xE0], answer
        assert answer[1] in codes, answer
        await nothing_routed(sbox, watcher)


def connect5(client_id: bytes = b"c", flags: int = 0x02, properties: bytes = b"", tail: bytes = b"") -> bytes:
    """An MQTT 5 CONNECT with raw flags, CONNECT properties, client id and what follows it (will, user name)."""
    body = mqtt_string("MQTT") + bytes([5, flags]) + b"\x00\x3c" + bytes([len(properties)]) + properties
    return packet(0x10, body + mqtt_string(client_id) + tail)


MQTT5_BAD_CONNECTS = {
    "reserved-flag": connect5(flags=0x03),
    "will-qos-without-will": connect5(flags=0x0A),  # [MQTT-3.1.2-11]
    "will-retain-without-will": connect5(flags=0x22),  # [MQTT-3.1.2-13]
    "client-id-nul": connect5(b"c\0"),
    "client-id-surrogate": connect5(b"c\xed\xa0\x80"),
    "user-name-nul": connect5(flags=0x82, tail=mqtt_string("u\0")),
    "user-property-nul": connect5(properties=b"\x26" + mqtt_string("a\0") + mqtt_string("b")),
    "authentication-data-without-method": connect5(properties=b"\x16" + mqtt_string("x")),
    "will-with-too-many-user-properties": connect5(
        flags=0x06,
        tail=encode_length(5 * (USER_PROPERTIES_MAX + 1))
        + b"\x26\0\0\0\0" * (USER_PROPERTIES_MAX + 1)
        + mqtt_string("sm/will")
        + mqtt_string("w"),
    ),
    "will-response-topic-wildcard": connect5(
        flags=0x06, tail=b"\x05\x08" + mqtt_string("r/#") + mqtt_string("sm/will") + mqtt_string("w")
    ),
}


@pytest.mark.parametrize("version", ["3.1.1", "5"])
async def test_client_id_over_the_limit_is_refused(sbox: Box, version: str, caplog: pytest.LogCaptureFixture) -> None:
    """Test that a client id longer than CLIENT_ID_MAX_BYTES is refused (3.1.1: CONNACK 2; MQTT 5: 0x85) before any
    session or login, with a log line that quotes only its start: one of 65,535 bytes made every line 64 KB."""
    client_id = "c" * (CLIENT_ID_MAX_BYTES + 1)
    async with raw_client(sbox.mqtt_port) as client:
        await client.send(connect_packet(client_id) if version == "3.1.1" else connect5(client_id.encode()))
        first, body = await client.read_packet()
    assert (first, body[-1] if version == "3.1.1" else body[1]) == (0x20, 0x02 if version == "3.1.1" else 0x85)
    assert len(sbox.broker.sessions) == 0
    assert max(len(record.getMessage()) for record in caplog.records) < 1000


# Well-formed CONNECTs that MQTT 5.0 calls a Protocol Error: CONNACK 0x82 (3.1.2.11.2-4, 2.2.2.2).
MQTT5_PROTOCOL_ERROR_CONNECTS = {
    "session-expiry-twice": connect5(properties=b"\x11\0\0\0\1\x11\0\0\0\2"),
    "receive-maximum-twice": connect5(properties=b"\x21\0\1\x21\0\2"),
    "receive-maximum-0": connect5(properties=b"\x21\0\0"),
    "maximum-packet-size-0": connect5(properties=b"\x27\0\0\0\0"),
}


@pytest.mark.parametrize("name", list(MQTT5_PROTOCOL_ERROR_CONNECTS))
async def test_mqtt5_connect_protocol_errors_get_connack_0x82(sbox: Box, name: str) -> None:
    """Test that a CONNECT repeating a once-only property, or with a Receive Maximum or Maximum Packet Size of 0,
    gets CONNACK 0x82 Protocol Error (not 0x81 Malformed Packet) and is closed, and the client gets no session."""
    async with raw_client(sbox.mqtt_port) as client:
        await client.send(MQTT5_PROTOCOL_ERROR_CONNECTS[name] + b"\xc0\x00")
        answer = await client.answers_until_closed(2)
    assert [(first, body[1]) for first, body in answer] == [(0x20, PROTOCOL_ERROR)], answer
    assert len(sbox.broker.sessions) == 0


@pytest.mark.parametrize("name", list(MQTT5_BAD_CONNECTS))
async def test_mqtt5_connect_the_codec_would_accept_is_refused(sbox: Box, name: str) -> None:
    """Test that an MQTT 5 CONNECT breaking a rule the mqtt5 codec does not check (U+0000 or bad UTF-8 in a
    string, the reserved flag, will QoS or retain without a will, Authentication Data alone, a will's Response Topic
    with a wildcard) gets CONNACK 0x81
    and is closed, and the client gets no session."""
    async with raw_client(sbox.mqtt_port) as client:
        await client.send(MQTT5_BAD_CONNECTS[name] + b"\xc0\x00")
        answer = await client.answers_until_closed(2)
    assert [(first, body[1]) for first, body in answer] == [(0x20, MALFORMED)], answer
    assert len(sbox.broker.sessions) == 0


async def test_a_malformed_packet_is_one_log_line(sbox: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that a smuggling PUBLISH is logged once by spotbox at WARNING or below, without a traceback."""
    caplog.set_level(logging.INFO)
    assert await server_answer(sbox, publish311(0x30, b"sm/+", HIDDEN, packet_id=None)) == []
    spotbox_lines = [r for r in caplog.records if r.name.startswith("spotbox") and "attacker" not in r.getMessage()]
    assert len([r for r in spotbox_lines if r.levelno >= logging.WARNING]) <= 1, caplog.text
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
