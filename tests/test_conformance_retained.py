"""A subscription gets the retained messages of its own new filter only, as Retain Handling says, on MQTT 3.1.1 and
5.0 [MQTT-3.3.1-6, MQTT-3.8.4-3 (3.1.1); 3.8.3.1 Retain Handling (5.0)] (issue 10)."""

from __future__ import annotations

from pathlib import Path

import mqtt5
import pytest

from tests.conformance import VERSIONS, Peer, peer, start
from tests.conftest import Box, BoxFactory

ALWAYS, IF_NEW, NEVER = (
    mqtt5.RetainHandling.SEND_ALWAYS,
    mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
    mqtt5.RetainHandling.SEND_NEVER,
)


@pytest.fixture
async def sbox(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox on SQLite with retained messages on a/1 and b/1."""
    box = await start(make_box, tmp_path)
    async with peer(box.mqtt_port, "3.1.1") as (publisher, _):
        await publisher.publish("a/1", b"a", 1, retain=True)
        await publisher.publish("b/1", b"b", 1, retain=True)
    return box


async def retained_for(sub: Peer, publisher: Peer, topic_filter: str, **options: mqtt5.RetainHandling) -> list[str]:
    """Subscribe to `topic_filter`; the topics of the retained messages that came before a marker on m/marker."""
    assert await sub.subscribe((topic_filter, 1), **options) == [1]
    await publisher.publish("m/marker", b"marker", 1)
    return [delivery.topic for delivery in await sub.received()]


@pytest.mark.parametrize("version", VERSIONS)
async def test_second_filter_gets_only_its_own_retained(sbox: Box, version: str) -> None:
    """Test that subscribing b/# after a/# delivers b's retained message, not a's again; and a repeat of the same
    filter delivers it again [MQTT-3.8.4-3]."""
    async with peer(sbox.mqtt_port, version) as (sub, _), peer(sbox.mqtt_port, version) as (publisher, _):
        assert await sub.subscribe(("m/#", 1)) == [1]
        assert await retained_for(sub, publisher, "a/#") == ["a/1"]
        assert await retained_for(sub, publisher, "b/#") == ["b/1"]
        assert await retained_for(sub, publisher, "b/#") == ["b/1"]


@pytest.mark.parametrize(
    ("handling", "expected"), [(ALWAYS, ["b/1"]), (IF_NEW, ["b/1"]), (NEVER, [])], ids=["always", "if-new", "never"]
)
async def test_retain_handling_of_a_new_filter_never_resends_the_old_ones(
    sbox: Box, handling: mqtt5.RetainHandling, expected: list[str]
) -> None:
    """Test that with each Retain Handling a new filter b/# gets at most b's retained message, never a's."""
    async with peer(sbox.mqtt_port, "5") as (sub, _), peer(sbox.mqtt_port, "5") as (publisher, _):
        assert await sub.subscribe(("m/#", 1)) == [1]
        assert await retained_for(sub, publisher, "a/#") == ["a/1"]
        assert await retained_for(sub, publisher, "b/#", retain_handling=handling) == expected
        # An existing subscription re-made with If New gets nothing; with Send Always, its own messages again.
        assert await retained_for(sub, publisher, "a/#", retain_handling=IF_NEW) == []
        assert await retained_for(sub, publisher, "a/#", retain_handling=ALWAYS) == ["a/1"]
