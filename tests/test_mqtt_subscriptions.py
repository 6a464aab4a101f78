"""The subscription tree: wildcards, the $-rule, options kept, shared groups taking turns, and cleanup."""

from __future__ import annotations

import timeit

from hypothesis import given, settings
from hypothesis import strategies as st

from spotbox.mqtt.subscriptions import Subscription, SubscriptionTree
from spotbox.mqtt.topics import matches


def tree_with(*subs: tuple[str, Subscription]) -> SubscriptionTree[str]:
    """A tree holding the given (client id, subscription) pairs."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    for key, sub in subs:
        tree.add(key, sub)
    return tree


def test_add_replaces_the_same_filter_and_keeps_its_options() -> None:
    """Test that subscribing again to a filter replaces the subscription, options included [MQTT-3.8.4-3]."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    assert tree.add("c1", Subscription("a/+", 0)) is False
    assert tree.add("c1", Subscription("a/+", 2, no_local=True, identifier=7)) is True
    assert tree.count == 1
    assert tree.match("a/b") == {"c1": [Subscription("a/+", 2, no_local=True, identifier=7)]}


def test_a_client_gets_every_overlapping_subscription() -> None:
    """Test that match gives a client all its matching subscriptions, for one copy at the highest QoS."""
    tree = tree_with(
        ("c1", Subscription("a/#", 0, identifier=1)),
        ("c1", Subscription("a/+", 2, identifier=2)),
        ("c1", Subscription("x", 1)),
        ("c2", Subscription("a/b", 1)),
    )
    found = tree.match("a/b")
    assert sorted(s.identifier or 0 for s in found["c1"]) == [1, 2]
    assert found["c2"] == [Subscription("a/b", 1)]


def test_hash_matches_the_parent_level_and_plus_one_level() -> None:
    """Test that "a/#" matches "a" and "+" matches exactly one (possibly empty) level."""
    tree = tree_with(("h", Subscription("a/#", 0)), ("p", Subscription("a/+", 0)), ("all", Subscription("#", 0)))
    assert set(tree.match("a")) == {"h", "all"}
    assert set(tree.match("a/")) == {"h", "p", "all"}
    assert set(tree.match("a/b/c")) == {"h", "all"}
    assert set(tree.match("b")) == {"all"}


def test_dollar_topics_are_not_matched_by_leading_wildcards() -> None:
    """Test [MQTT-4.7.2-1]: "#" and "+/..." do not match "$SYS/..." but "$SYS/#" does."""
    tree = tree_with(
        ("all", Subscription("#", 0)), ("plus", Subscription("+/x", 0)), ("sys", Subscription("$SYS/#", 0))
    )
    assert set(tree.match("$SYS/x")) == {"sys"}
    assert set(tree.match("SYS/x")) == {"all", "plus"}


def test_remove_and_remove_all() -> None:
    """Test that unsubscribing removes only that filter, and a session's end removes all of its filters."""
    tree = tree_with(
        ("c1", Subscription("a/b", 1)),
        ("c1", Subscription("a/#", 1)),
        ("c1", Subscription("a/b", 1, share_group="g")),
        ("c2", Subscription("a/b", 0)),
    )
    assert tree.remove("c1", "a/b") is True
    assert tree.remove("c1", "a/b") is False
    assert tree.remove("c1", "nothing/here") is False
    assert tree.remove("c2", "a/b", share_group="g") is False
    assert [s.full_filter for s in tree.filters_of("c1")] == ["a/#", "$share/g/a/b"]
    assert tree.remove_all("c1") == 2
    assert tree.filters_of("c1") == []
    assert tree.match("a/b") == {"c2": [Subscription("a/b", 0)]}
    assert tree.count == 1


def test_removing_everything_leaves_an_empty_tree() -> None:
    """Test that unsubscribed levels are pruned, so the tree does not grow with every filter ever used."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    for n in range(100):
        tree.add(f"c{n}", Subscription(f"robot/R-{n}/#", 1))
        tree.add(f"c{n}", Subscription(f"$share/g/robot/R-{n}/status", 1, share_group="g"))
    tree.add("keep", Subscription("robot", 0))
    for n in range(100):
        tree.remove_all(f"c{n}")
    assert tree.count == 1
    root = tree._root  # the structure itself: nothing below "robot" is left
    assert list(root.children) == ["robot"]
    assert root.children["robot"].children == {}


def test_a_shared_subscription_delivers_to_one_member_in_turn() -> None:
    """Test that each message goes to exactly one member of a share group, members taking turns."""
    tree = tree_with(*[(f"w{n}", Subscription("jobs/+", 1, share_group="g")) for n in range(3)])
    chosen = [next(iter(tree.match("jobs/1"))) for _ in range(6)]
    assert chosen == ["w0", "w1", "w2", "w0", "w1", "w2"]


def test_a_shared_subscription_skips_unavailable_members() -> None:
    """Test that disconnected members are skipped, and nobody gets the message when no member is available."""
    tree = tree_with(*[(f"w{n}", Subscription("jobs/#", 1, share_group="g")) for n in range(3)])
    online = {"w0", "w2"}
    chosen = [next(iter(tree.match("jobs/1", online.__contains__))) for _ in range(4)]
    assert chosen == ["w0", "w2", "w0", "w2"]
    assert tree.match("jobs/1", lambda key: False) == {}


def test_groups_and_plain_subscriptions_are_independent() -> None:
    """Test that two share groups each get a copy, as does a plain subscriber, and same-named groups on other
    filters are separate shared subscriptions."""
    tree = tree_with(
        ("a1", Subscription("t", 1, share_group="a")),
        ("a2", Subscription("t", 1, share_group="a")),
        ("b1", Subscription("t", 0, share_group="b")),
        ("b1", Subscription("#", 0, share_group="a")),
        ("plain", Subscription("t", 2)),
    )
    found = tree.match("t")
    assert set(found) == {"a1", "b1", "plain"}
    assert sorted(s.full_filter for s in found["b1"]) == ["$share/a/#", "$share/b/t"]
    assert set(tree.match("t")) == {"a2", "b1", "plain"}


def test_match_cost_does_not_grow_with_the_number_of_subscriptions() -> None:
    """Test that matching one robot's topic costs about the same with 10 or 10,000 robots subscribed."""

    def cost(robots: int) -> float:
        tree: SubscriptionTree[str] = SubscriptionTree()
        for n in range(robots):
            tree.add(f"c{n}", Subscription(f"robot/R-{n}/#", 1))
        tree.add("console", Subscription("robot/+/status", 0))
        return min(timeit.repeat(lambda: tree.match("robot/R-5/status"), number=500, repeat=5))

    # A linear scan would be ~1000 times slower; the bound leaves room for a loaded machine.
    assert cost(10_000) < 5 * cost(10)


filters = st.lists(st.sampled_from(["a", "b", "", "+", "$s"]), min_size=1, max_size=3)
subscriptions = st.lists(
    st.tuples(st.sampled_from(["c1", "c2", "c3"]), filters, st.booleans(), st.integers(0, 2)), max_size=12
)
topics = st.lists(st.sampled_from(["a", "b", "", "$s"]), min_size=1, max_size=4).map("/".join)


@settings(max_examples=200, deadline=None)
@given(subscriptions, topics, st.lists(st.integers(0, 11), max_size=4))
def test_match_agrees_with_checking_every_filter(
    subs: list[tuple[str, list[str], bool, int]], topic: str, removed: list[int]
) -> None:
    """Test that after any adds and removes the tree finds exactly the subscriptions a full scan would."""
    tree: SubscriptionTree[str] = SubscriptionTree()
    expected: dict[tuple[str, str], Subscription] = {}
    for key, levels, hash_last, qos in subs:
        sub = Subscription("/".join([*levels, "#"] if hash_last else levels), qos)
        tree.add(key, sub)
        expected[key, sub.filter] = sub
    for index in removed:
        if index < len(subs):
            key, levels, hash_last, _ = subs[index]
            topic_filter = "/".join([*levels, "#"] if hash_last else levels)
            assert tree.remove(key, topic_filter) == ((key, topic_filter) in expected)
            expected.pop((key, topic_filter), None)
    assert tree.count == len(expected)
    found = {(key, sub.filter): sub for key, subs_ in tree.match(topic).items() for sub in subs_}
    assert found == {k: s for k, s in expected.items() if matches(s.filter, topic)}
