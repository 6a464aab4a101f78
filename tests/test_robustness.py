"""Bad input never crashes spotbox or hurts other clients: malformed MQTT, HTTP on the MQTT port, fuzz, URL tricks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from spotbox.loadgen import connect_packet, mqtt_string
from spotbox.settings import BUNDLED_SCHEMA, Settings
from spotbox.status import StatusRecord
from spotbox.validation import Rejection, StatusValidator
from tests.conftest import Box, BoxFactory
from tests.helpers import VALID_STATUS, mqtt_client, payload
from tests.raw_mqtt import CONNACK_ACCEPTED, publish_packet, raw_client, subscribe_packet
from tests.test_limits import NOW

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

CONNECT = connect_packet("bad-client")


@pytest.fixture
async def sqlite_box(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite: these tests are about the broker and the HTTP edge, not about storage."""
    settings = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}", batch_wait_ms=1)
    return await make_box(settings)


class StillStoring:
    """A well-behaved robot: each call publishes a status never sent before and checks that it was stored."""

    def __init__(self, box: Box) -> None:
        self.box = box

    async def check(self) -> None:
        nonce = uuid.uuid4().hex
        async with mqtt_client(self.box.mqtt_port, timeout=5) as robot:
            await robot.publish("robot/ROBOT-OK/status", payload(nonce=nonce), qos=1, timeout=5)
        stored = await self.box.history("ROBOT-OK", limit="5000", include_payload="true")
        assert nonce in [item["payload"].get("nonce") for item in stored]


async def send_and_hang_up(box: Box, data: bytes, *, connect_first: bool) -> None:
    """Send `data` on a fresh MQTT connection (after a good CONNECT when asked), then close it."""
    async with raw_client(box.mqtt_port) as client:
        if connect_first:
            await client.send(CONNECT)
            async with asyncio.timeout(10):
                assert await client.connack() == CONNACK_ACCEPTED
        with contextlib.suppress(ConnectionError):  # the server may already have hung up on us
            await client.send(data)


MALFORMED = {
    "http-request": (False, b"GET /mqtt HTTP/1.1\r\nHost: spotbox\r\nUpgrade: websocket\r\n\r\n"),
    "garbage": (False, b"\xff\xff\xff\xff\xff\xff\xff"),
    "reserved-type-0": (False, b"\x00\x00"),
    "bad-protocol-name": (False, CONNECT.replace(b"MQTT", b"MQTX")),
    # A 3.1.1 CONNECT relabelled level 5: no properties length, so a malformed MQTT 5 CONNECT.
    "mqtt-5-connect-without-properties": (False, CONNECT.replace(b"MQTT\x04", b"MQTT\x05")),
    "remaining-length-too-long": (False, b"\x10\xff\xff\xff\xff\x7f"),
    "truncated-connect": (False, CONNECT[:9]),
    "publish-before-connect": (False, publish_packet(b"robot/X/status", payload())),
    "invalid-utf8-topic": (True, publish_packet(b"robot/\xff\xfe/status", payload())),
    "nul-in-topic": (True, publish_packet(b"robot/A\x00/status", payload())),
    "topic-longer-than-packet": (True, b"\x30\x03\x00\x10ab"),
    "wildcard-topic": (True, publish_packet(b"robot/+/status", payload())),
    "qos-3": (True, b"\x36" + publish_packet(b"t", b"x")[1:]),
    "empty-subscribe": (True, subscribe_packet(b"\x00\x01")),
    "subscribe-bad-qos": (True, subscribe_packet(b"\x00\x01" + mqtt_string(b"a/b") + b"\x07")),
    "second-connect": (True, CONNECT),
    "reserved-type-15": (True, b"\xf0\x00"),
    "truncated-publish": (True, publish_packet(b"robot/X/status", payload())[:20]),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_mqtt_leaves_others_publishing(
    sqlite_box: Box, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that a malformed packet (or HTTP) on the MQTT port ends at most its own connection, silently for others."""
    robot = StillStoring(sqlite_box)
    await robot.check()
    connect_first, data = MALFORMED[name]
    await send_and_hang_up(sqlite_box, data, connect_first=connect_first)
    await robot.check()
    # Handled, not crashed: nothing reached spotbox's "connection ended by an error" traceback path.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("spotbox")]


async def test_invalid_utf8_topic_is_refused_with_a_reason(sqlite_box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that a PUBLISH topic that is not UTF-8 closes that connection with the reason logged."""
    async with raw_client(sqlite_box.mqtt_port) as client:
        await client.send(CONNECT)
        async with asyncio.timeout(10):
            assert await client.connack() == CONNACK_ACCEPTED
            await client.send(publish_packet(b"robot/\xff/status", payload()))
            await client.wait_closed_by_server()
    assert "PUBLISH topic name is not valid UTF-8" in caplog.text  # [MQTT-1.5.3-1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def to_json(value: Any) -> bytes:
    """stdlib json, not orjson: it writes integers of any size, and huge numbers are inputs worth trying."""
    return json.dumps(value).encode()


# A valid status with one field replaced by anything, or any JSON at all, or any bytes.
status_like = st.builds(
    lambda key, value: to_json({**VALID_STATUS, key: value}),
    st.sampled_from([*VALID_STATUS, "extra"]),
    json_values,
)
fuzz_payloads = status_like | json_values.map(to_json) | st.binary(max_size=300)
VALIDATOR = StatusValidator(BUNDLED_SCHEMA)


@settings(max_examples=400, deadline=None)
@given(raw=fuzz_payloads)
def test_validator_never_raises(raw: bytes) -> None:
    """Test that the validator answers every payload with a record or a reason, and a record is in range."""
    verdict = VALIDATOR.check("ROBOT-F", raw, NOW)
    if isinstance(verdict, Rejection):
        assert verdict.errors
        assert all(isinstance(error, str) and ":" in error for error in verdict.errors)
    else:
        assert isinstance(verdict, StatusRecord)
        assert 1 <= verdict.battery_level <= 100


# One spotbox for all examples is the point: it must survive every one of them. Its state needs no reset.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=200), connect_first=st.booleans(), status=fuzz_payloads)
async def test_fuzzed_mqtt_traffic_leaves_others_publishing(
    sqlite_box: Box, data: bytes, connect_first: bool, status: bytes
) -> None:
    """Test that random bytes on the MQTT port and random status payloads never stop valid statuses being stored."""
    await send_and_hang_up(sqlite_box, data, connect_first=connect_first)
    async with mqtt_client(sqlite_box.mqtt_port, timeout=5) as fuzzer:
        await fuzzer.publish("robot/ROBOT-FUZZ/status", status, qos=1, timeout=5)
    await StillStoring(sqlite_box).check()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/robots/%00/history", 400),
        ("/robots/a%2Fb/history", 400),
        ("/robots/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/feed", 400),
        ("/robots/%252E%252E/history", 400),
        ("/robots/r%C3%B6bot/history", 400),
        ("/robots/ROBOT%20001/feed", 400),
        ("/robots/..;/history", 400),
        ("/robots/%2E%2E/history", 400),  # ".." is not a serial (issue 11): refused like any other bad one
        ("/robots/%2E/history", 400),
        ("/robots/NOT-A-ROBOT/history", 404),
        ("/robots/NOT-A-ROBOT/history?limit=99999999999999999999999999", 400),
        ("/robots/NOT-A-ROBOT/history?limit=-1", 400),
        ("/robots/NOT-A-ROBOT/history?start_time=99999-01-01T00:00:00Z", 400),
        ("/robots/NOT-A-ROBOT/history?start_time=%00", 400),
        ("/robots/NOT-A-ROBOT/history?cursor=" + "A" * 4000, 400),
    ],
)
async def test_path_tricks_and_bad_parameters(sqlite_box: Box, path: str, status: int) -> None:
    """Test that odd serials and parameters get 400 (or 404 for a well-formed unknown robot) in the error shape."""
    # encoded=True: the bytes of the path go out as written, not normalized by the client.
    url = URL(f"{sqlite_box.base_url}{path}", encoded=True)
    async with sqlite_box.http.get(url, allow_redirects=False) as resp:
        body: Any = await resp.json()
        assert resp.status == status, body
    assert set(body) == {"error", "detail"}
