"""The retained store: last message per topic, deletion, wildcards with the $-rule, budget and expiry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotbox.mqtt.message import Message, Properties
from spotbox.mqtt.retained import RetainedStore, size_of
from spotbox.mqtt.topics import matches


def msg(topic: str, payload: bytes = b"x", expiry: int | None = None, created: float = 0.0) -> Message:
    """A retained QoS 1 message."""
    properties = Properties(message_expiry_interval=expiry) if expiry is not None else None
    return Message(topic, payload, 1, True, properties, created)


def topics_of(messages: list[Message]) -> set[str]:
    """The topics of `messages`."""
    return {m.topic for m in messages}


def test_the_last_retained_message_replaces_the_previous() -> None:
    """Test that a topic keeps only its newest retained message [MQTT-3.3.1-5]."""
    store = RetainedStore(10, 100_000)
    assert store.put(msg("a/b", b"one"))
    assert store.put(msg("a/b", b"two!"))
    assert store.count == 1
    assert store.bytes == size_of(msg("a/b", b"two!"))
    assert [m.payload for m in store.match("a/b")] == [b"two!"]


def test_an_empty_payload_deletes_and_is_not_retained() -> None:
    """Test that an empty retained payload removes the topic's message and is not kept [MQTT-3.3.1-10/11]."""
    store = RetainedStore(10, 100_000)
    store.put(msg("a/b"))
    store.put(msg("a/c"))
    assert store.put(msg("a/b", b""))
    assert store.put(msg("never/retained", b""))
    assert topics_of(store.match("#")) == {"a/c"}
    assert store.count == 1
    assert store.get("a/b") is None
    store.put(msg("a/c", b""))
    assert store.bytes == 0
    assert store._root.children == {}  # nothing of the deleted topics is left in the tree


def test_match_uses_wildcards_and_the_dollar_rule() -> None:
    """Test that a new subscription's filter finds exactly its retained messages, $-topics only by name."""
    store = RetainedStore(100, 10_000)
    for topic in ("sport", "sport/tennis", "sport/tennis/p1", "sport/golf", "/lead", "$SYS/load", "other"):
        store.put(msg(topic))
    assert topics_of(store.match("sport/#")) == {"sport", "sport/tennis", "sport/tennis/p1", "sport/golf"}
    assert topics_of(store.match("sport/+")) == {"sport/tennis", "sport/golf"}
    assert topics_of(store.match("+/+")) == {"sport/tennis", "sport/golf", "/lead"}
    assert topics_of(store.match("#")) == {"sport", "sport/tennis", "sport/tennis/p1", "sport/golf", "/lead", "other"}
    assert topics_of(store.match("+/load")) == set()  # [MQTT-4.7.2-1]
    assert topics_of(store.match("$SYS/#")) == {"$SYS/load"}
    assert topics_of(store.match("sport/tennis")) == {"sport/tennis"}
    assert store.match("nothing/+") == []


def test_over_the_message_budget_the_newest_is_refused_and_counted() -> None:
    """Test that past max_messages a new topic is refused (False, counted) while replacing one still works."""
    store = RetainedStore(2, 10_000)
    assert store.put(msg("a"))
    assert store.put(msg("b"))
    assert not store.put(msg("c"))
    assert store.refused == 1
    assert store.put(msg("a", b"replaced"))
    assert topics_of(store.match("#")) == {"a", "b"}


def test_over_the_byte_budget_the_newest_is_refused_and_the_old_one_stays() -> None:
    """Test that a message that would exceed max_bytes is refused and the topic keeps its previous message."""
    one = size_of(msg("t", b"0123456789"))
    store = RetainedStore(100, one + 10)
    assert store.put(msg("t", b"0123456789"))
    assert not store.put(msg("u", b"0123456789"))  # would be twice as much
    assert not store.put(msg("t", b"0" * 21))  # a replacement that grows past the budget
    assert store.refused == 2
    assert store.get("t") == msg("t", b"0123456789")
    assert store.bytes == one


def test_negative_limits_are_refused() -> None:
    """Test that a store cannot be built with negative limits."""
    with pytest.raises(ValueError, match="negative"):
        RetainedStore(-1, 10)


def test_expired_messages_are_skipped_and_dropped() -> None:
    """Test that expired retained messages are not delivered and drop_expired frees them [MQTT-3.3.2-5]."""
    store = RetainedStore(10, 100_000)
    store.put(msg("keep"))
    store.put(msg("short", expiry=5, created=100.0))
    store.put(msg("long", expiry=50, created=100.0))
    assert topics_of(store.match("#", now=104.0)) == {"keep", "short", "long"}
    assert topics_of(store.match("#", now=105.0)) == {"keep", "long"}
    assert store.drop_expired(105.0) == 1
    assert store.count == 2
    store.put(msg("long", b"again"))  # replaced without expiry: never dropped now
    assert store.drop_expired(10_000.0) == 0


levels = st.lists(st.sampled_from(["a", "b", "", "$s"]), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(levels, st.booleans()), max_size=15),
    st.lists(st.sampled_from(["a", "b", "", "+", "$s"]), min_size=1, max_size=3),
    st.booleans(),
)
def test_match_agrees_with_checking_every_topic(
    puts: list[tuple[list[str], bool]], wanted: list[str], hash_last: bool
) -> None:
    """Test that after any puts and deletes, match finds exactly the retained topics the filter matches."""
    store = RetainedStore(1000, 100_000)
    held: set[str] = set()
    for topic_levels, delete in puts:
        topic = "/".join(topic_levels)
        store.put(msg(topic, b"" if delete else b"x"))
        (held.discard if delete else held.add)(topic)
    topic_filter = "/".join([*wanted, "#"] if hash_last else wanted)
    assert topics_of(store.match(topic_filter)) == {t for t in held if matches(topic_filter, t)}
    assert store.count == len(held)
    assert store.bytes == sum(size_of(msg(t, b"x")) for t in held)
