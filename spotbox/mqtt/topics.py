"""Topic names, topic filters, shared subscriptions and matching, per MQTT 3.1.1 section 4.7 and MQTT 5 4.7-4.8."""

from __future__ import annotations

SHARE_PREFIX = "$share/"
# A UTF-8 string field holds at most 65,535 bytes [MQTT-1.5.3].
MAX_STRING_BYTES = 0xFFFF


def valid_topic_name(name: str) -> str | None:
    """Why `name` cannot be a topic name in a PUBLISH (or a will), or None when it can."""
    if not name:
        return "empty topic name"  # [MQTT-4.7.3-1]
    if "+" in name or "#" in name:
        return "wildcard in topic name"  # [MQTT-3.3.2-2] [MQTT-4.7.1-1]
    if "\0" in name:
        return "U+0000 in topic name"  # [MQTT-4.7.3-2]
    if len(name) > MAX_STRING_BYTES // 4 and len(name.encode()) > MAX_STRING_BYTES:
        return "topic name longer than 65,535 bytes"  # [MQTT-4.7.3-3]
    return None


def valid_topic_filter(topic_filter: str) -> str | None:  # noqa: PLR0911 - one reason per rule
    """Why `topic_filter` is not a valid topic filter, or None when it is (shares are checked by parse_shared)."""
    if not topic_filter:
        return "empty topic filter"  # [MQTT-4.7.3-1]
    if "\0" in topic_filter:
        return "U+0000 in topic filter"  # [MQTT-4.7.3-2]
    if len(topic_filter) > MAX_STRING_BYTES // 4 and len(topic_filter.encode()) > MAX_STRING_BYTES:
        return "topic filter longer than 65,535 bytes"  # [MQTT-4.7.3-3]
    if "+" not in topic_filter and "#" not in topic_filter:
        return None
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be a whole level, and the last"  # [MQTT-4.7.1-2]
        if "+" in level and level != "+":
            return "'+' must be a whole level"  # [MQTT-4.7.1-3]
    return None


def parse_shared(topic_filter: str) -> tuple[str, str] | str | None:
    """(share name, inner filter) of a `$share/{name}/{filter}` filter, a reason string when it is an invalid
    shared subscription, or None when `topic_filter` is not a shared subscription at all."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    group, slash, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group:
        return "empty share name"  # [MQTT-4.8.2-1]
    if "+" in group or "#" in group:
        return "wildcard in share name"  # [MQTT-4.8.2-1]
    if not slash or not inner:
        return "shared subscription without a topic filter"  # [MQTT-4.8.2-2]
    if problem := valid_topic_filter(inner):
        return problem
    return group, inner


def matches(topic_filter: str, topic: str) -> bool:
    """True when topic name `topic` matches `topic_filter` (not a $share filter: pass its inner filter)."""
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic_filter == topic
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False  # [MQTT-4.7.2-1] a leading wildcard never matches a topic beginning with "$"
    levels = topic.split("/")
    wanted = topic_filter.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True  # also the parent level: "sport/#" matches "sport" (4.7.1.2)
        if index >= len(levels):
            return False
        if level != "+" and level != levels[index]:
            return False
    return len(levels) == len(wanted)
