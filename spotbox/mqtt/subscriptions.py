"""Who subscribed to what: a tree of topic filters by level, with MQTT 5 options and `$share` groups.

Matching a topic walks one path per wildcard alternative, so its cost grows with the number of levels, not with
the number of subscriptions. The router aggregates what `match` returns: one copy per client at the highest
granted QoS, with every matching subscription identifier [MQTT-3.3.4-2] [MQTT-3.3.4-3].
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True, frozen=True)
class Subscription:
    """One subscription; `filter` is the topic filter without its `$share/{share_group}/` prefix."""

    filter: str
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    identifier: int | None = None
    share_group: str | None = None

    @property
    def full_filter(self) -> str:
        """The filter as the client sent it, `$share/{group}/` included."""
        return f"$share/{self.share_group}/{self.filter}" if self.share_group is not None else self.filter


class _Group(Generic[K]):
    """The members of one shared subscription (share name and filter); one of them gets each message."""

    __slots__ = ("members", "next")

    def __init__(self) -> None:
        self.members: dict[K, Subscription] = {}
        self.next = 0

    def pick(self, available: Callable[[K], bool] | None) -> tuple[K, Subscription] | None:
        """The next member in turn that is available, or None when none is."""
        keys = list(self.members)
        count = len(keys)
        for offset in range(count):
            index = (self.next + offset) % count
            if available is None or available(keys[index]):
                self.next = index + 1
                return keys[index], self.members[keys[index]]
        return None


class _Node(Generic[K]):
    """One level of the tree: the subscriptions whose filter ends here, and the next levels."""

    __slots__ = ("children", "groups", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.subscribers: dict[K, Subscription] = {}
        self.groups: dict[str, _Group[K]] = {}

    def empty(self) -> bool:
        return not (self.children or self.subscribers or self.groups)


class SubscriptionTree(Generic[K]):
    """Every session's subscriptions, keyed by `K` (the client id); at most one per key, filter and share group."""

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._by_key: dict[K, dict[tuple[str, str | None], Subscription]] = {}
        self._count = 0
        self._nodes = 0

    @property
    def nodes(self) -> int:
        """How many levels (nodes) the tree holds: what its memory grows with, more than with subscriptions."""
        return self._nodes

    def count_of(self, key: K) -> int:
        """How many subscriptions `key` holds."""
        own = self._by_key.get(key)
        return len(own) if own is not None else 0

    def holds(self, key: K, topic_filter: str, share_group: str | None = None) -> bool:
        """True when `key` already has a subscription to `topic_filter` (in `share_group`)."""
        own = self._by_key.get(key)
        return own is not None and (topic_filter, share_group) in own

    @property
    def count(self) -> int:
        """How many subscriptions the tree holds."""
        return self._count

    def add(self, key: K, sub: Subscription) -> bool:
        """Add `sub` for `key`; True when it replaced one with the same filter and share group [MQTT-3.8.4-3]."""
        node = self._root
        for level in sub.filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
                self._nodes += 1
            node = child
        if sub.share_group is None:
            holder = node.subscribers
        else:
            group = node.groups.get(sub.share_group)
            if group is None:
                group = node.groups[sub.share_group] = _Group()
            holder = group.members
        replaced = key in holder
        holder[key] = sub
        self._by_key.setdefault(key, {})[sub.filter, sub.share_group] = sub
        self._count += not replaced
        return replaced

    def remove(self, key: K, topic_filter: str, share_group: str | None = None) -> bool:
        """Remove `key`'s subscription to `topic_filter` (in `share_group`); False when there was none."""
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        node = path[-1]
        if share_group is None:
            if node.subscribers.pop(key, None) is None:
                return False
        else:
            group = node.groups.get(share_group)
            if group is None or group.members.pop(key, None) is None:
                return False
            if not group.members:
                del node.groups[share_group]
        own = self._by_key[key]
        del own[topic_filter, share_group]
        if not own:
            del self._by_key[key]
        self._count -= 1
        # Prune the levels left empty, deepest first, so the tree does not keep every filter ever used.
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):
            if not path[depth].empty():
                break
            del path[depth - 1].children[levels[depth - 1]]
            self._nodes -= 1
        return True

    def remove_all(self, key: K) -> int:
        """Remove every subscription of `key` (its session ended); how many there were."""
        own = list(self._by_key.get(key, {}))
        for topic_filter, share_group in own:
            self.remove(key, topic_filter, share_group)
        return len(own)

    def filters_of(self, key: K) -> list[Subscription]:
        """The subscriptions of `key`, in the order they were first made."""
        return list(self._by_key.get(key, {}).values())

    def match(self, topic: str, available: Callable[[K], bool] | None = None) -> dict[K, list[Subscription]]:
        """Every key with all its subscriptions matching topic name `topic`; for each shared subscription, one
        member in turn among those `available` accepts [MQTT-4.8.2-3] (MQTT 5, 4.8.2)."""
        out: dict[K, list[Subscription]] = {}
        if not self._root.children:
            return out  # no subscription at all: nothing to walk
        levels = topic.split("/")
        last = len(levels)
        # [MQTT-4.7.2-1] a filter starting with a wildcard does not match a topic starting with "$".
        dollar = topic.startswith("$")
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            children = node.children
            if index == last:
                self._collect(node, out, available)
                if (hash_node := children.get("#")) is not None:
                    self._collect(hash_node, out, available)  # "a/#" also matches "a"
                continue
            if index or not dollar:
                if (hash_node := children.get("#")) is not None:
                    self._collect(hash_node, out, available)
                if (plus := children.get("+")) is not None:
                    stack.append((plus, index + 1))
            if (child := children.get(levels[index])) is not None:
                stack.append((child, index + 1))
        return out

    @staticmethod
    def _collect(node: _Node[K], out: dict[K, list[Subscription]], available: Callable[[K], bool] | None) -> None:
        for key, sub in node.subscribers.items():
            if (subs := out.get(key)) is None:
                out[key] = [sub]
            else:
                subs.append(sub)
        for group in node.groups.values():
            if (chosen := group.pick(available)) is not None:
                out.setdefault(chosen[0], []).append(chosen[1])
