"""Topic names, filters, shared subscriptions and matching, per MQTT 3.1.1 section 4.7 and MQTT 5 4.8."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spotbox.mqtt.topics import matches, parse_shared, valid_topic_filter, valid_topic_name
from spotbox.users import filter_covers


@pytest.mark.parametrize("name", ["robot/R-1/status", "/", "a//b", "$SYS/x", "sport/tennis", " ", "ü/ß", "a" * 65535])
def test_valid_topic_names(name: str) -> None:
    """Test that topic names the standard allows are accepted, spaces, empty levels and $ included."""
    assert valid_topic_name(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [("", "empty"), ("a/+", "wildcard"), ("#", "wildcard"), ("a/b#", "wildcard"), ("a\0b", "U+0000")],
)
def test_invalid_topic_names(name: str, reason: str) -> None:
    """Test that empty names, wildcards and NUL are refused in topic names with the reason [MQTT-4.7.3-1]."""
    assert reason in (valid_topic_name(name) or "")


def test_topic_name_length_is_counted_in_utf8_bytes() -> None:
    """Test that a name is refused over 65,535 UTF-8 bytes even when it has fewer characters."""
    assert valid_topic_name("é" * 32767) is None  # 65,534 bytes
    assert "65,535" in (valid_topic_name("é" * 32768) or "")


@pytest.mark.parametrize("topic_filter", ["#", "+", "+/+", "a/#", "a/+/b", "/+", "+/", "$SYS/#", "a/b", "$share"])
def test_valid_topic_filters(topic_filter: str) -> None:
    """Test that filters with whole-level wildcards, '#' last, are accepted (4.7.1)."""
    assert valid_topic_filter(topic_filter) is None


@pytest.mark.parametrize("topic_filter", ["", "a#", "#/a", "a/#/b", "a/b+", "+a", "a/++", "a\0"])
def test_invalid_topic_filters(topic_filter: str) -> None:
    """Test that partial-level wildcards, '#' not last, NUL and the empty filter are refused [MQTT-4.7.1-2]."""
    assert valid_topic_filter(topic_filter) is not None


def test_parse_shared_splits_group_and_filter() -> None:
    """Test that $share/{group}/{filter} gives the group and the inner filter, '/' levels kept."""
    assert parse_shared("$share/workers/robot/+/status") == ("workers", "robot/+/status")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("$share/g//") == ("g", "/")


@pytest.mark.parametrize("topic_filter", ["robot/#", "$SYS/#", "$share", "$shared/g/a", "share/g/a"])
def test_parse_shared_leaves_ordinary_filters_alone(topic_filter: str) -> None:
    """Test that a filter not starting with "$share/" is not a shared subscription."""
    assert parse_shared(topic_filter) is None


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [
        ("$share/", "empty share name"),
        ("$share//a", "empty share name"),
        ("$share/g", "without a topic filter"),
        ("$share/g/", "without a topic filter"),
        ("$share/g+/a", "wildcard in share name"),
        ("$share/#/a", "wildcard in share name"),
        ("$share/g/a#", "'#'"),
    ],
)
def test_parse_shared_gives_the_reason_for_a_bad_share(topic_filter: str, reason: str) -> None:
    """Test that an invalid shared subscription is a reason string, not a silent ordinary filter [MQTT-4.8.2-1]."""
    result = parse_shared(topic_filter)
    assert isinstance(result, str)
    assert reason in result


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sport/tennis/player1/#", "sport/tennis/player1", True),  # '#' includes the parent level
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "anything/at/all", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),  # '+' matches an empty level
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
        ("A/b", "a/b", False),  # case sensitive
        ("#", "$SYS/broker", False),  # [MQTT-4.7.2-1]
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),  # [MQTT-4.7.2-1]
        ("$SYS/#", "$SYS/monitor/Clients", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        ("a/+/#", "a/b", True),
        ("a/+/#", "a", False),
    ],
)
def test_matches_follows_the_standard_examples(topic_filter: str, topic: str, expected: bool) -> None:
    """Test the matching rules with the standard's own examples of 4.7.1 and 4.7.2."""
    assert matches(topic_filter, topic) is expected


levels = st.lists(st.sampled_from(["a", "b", "", "$x", "$SYS"]), min_size=1, max_size=4)


@given(levels, st.lists(st.sampled_from(["a", "b", "", "+", "$x", "$SYS"]), min_size=1, max_size=4), st.booleans())
def test_matches_agrees_with_the_grant_check(topic: list[str], wanted: list[str], hash_last: bool) -> None:
    """Test that matches() and users.filter_covers() (which grants rely on) agree on every topic."""
    topic_filter = "/".join([*wanted, "#"] if hash_last else wanted)
    assert matches(topic_filter, "/".join(topic)) == filter_covers(topic_filter, "/".join(topic))
