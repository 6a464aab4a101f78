"""Retained messages: the last retained message of each topic, bounded in count and bytes.

Held in a tree by topic level, so a new subscription's filter walks only the levels it can match instead of
testing every retained topic.
"""

from __future__ import annotations

from spotbox.mqtt.message import Message, footprint


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: Message | None = None


# What a retained message costs beyond its text: each level of its topic is a node of the tree (about 400 bytes),
# and each user property a tuple (`message.footprint`). Without them, 3,000 messages of 500 levels (counted 3 MB)
# held 350 MB, and 300 messages of 1-byte payloads with 1 MB of user properties (counted 300 bytes) 330 MB.
LEVEL_BYTES = 400


def size_of(message: Message) -> int:
    """What a retained message counts against the byte budget: payload, topic, properties, and what they cost."""
    return footprint(message) + LEVEL_BYTES * (message.topic.count("/") + 1)


class RetainedStore:
    """At most `max_messages` retained messages of at most `max_bytes` in all; past either, new ones are refused."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 0 or max_bytes < 0:
            raise ValueError("retained message limits must not be negative")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.refused = 0  # messages refused for the budget, for /metrics
        self._root = _Node()
        self._by_topic: dict[str, Message] = {}
        self._expiring: set[str] = set()  # topics whose message has a Message Expiry Interval
        self._bytes = 0

    @property
    def count(self) -> int:
        """How many retained messages are held."""
        return len(self._by_topic)

    @property
    def bytes(self) -> int:
        """How many bytes the retained messages count against the budget."""
        return self._bytes

    def get(self, topic: str) -> Message | None:
        """The retained message of `topic`, if any."""
        return self._by_topic.get(topic)

    def put(self, message: Message) -> bool:
        """Retain `message` in place of its topic's last one [MQTT-3.3.1-5]; an empty payload removes it and
        is not kept itself [MQTT-3.3.1-10] [MQTT-3.3.1-11]. False when the budget refuses it (the message
        retained before on that topic, if any, stays)."""
        topic = message.topic
        if not message.payload:
            self._delete(topic)
            return True
        old = self._by_topic.get(topic)
        new_bytes = self._bytes + size_of(message) - (size_of(old) if old else 0)
        if new_bytes > self.max_bytes or (old is None and len(self._by_topic) >= self.max_messages):
            self.refused += 1
            return False
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        node.message = message
        self._by_topic[topic] = message
        self._bytes = new_bytes
        has_expiry = message.properties is not None and message.properties.message_expiry_interval is not None
        if has_expiry:
            self._expiring.add(topic)
        else:
            self._expiring.discard(topic)
        return True

    def match(self, topic_filter: str, now: float | None = None) -> list[Message]:
        """The retained messages whose topic matches `topic_filter` (not a $share filter), skipping those expired
        at `now` when it is given."""
        out: list[Message] = []
        levels = topic_filter.split("/")
        last = len(levels)
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == last:
                if node.message is not None:
                    out.append(node.message)
                continue
            level = levels[index]
            if level == "#":
                # The level above and everything below it; [MQTT-4.7.2-1] at the first level, no $-topics.
                self._subtree(node, out, skip_dollar=index == 0, include_self=index > 0)
            elif level == "+":
                for name, child in node.children.items():
                    if not (index == 0 and name.startswith("$")):  # [MQTT-4.7.2-1]
                        stack.append((child, index + 1))
            elif (exact := node.children.get(level)) is not None:
                stack.append((exact, index + 1))
        if now is not None:
            return [message for message in out if not message.expired(now)]
        return out

    def drop_expired(self, now: float) -> int:
        """Forget the messages whose expiry interval has passed; how many were dropped."""
        expired = [topic for topic in self._expiring if self._by_topic[topic].expired(now)]
        for topic in expired:
            self._delete(topic)
        return len(expired)

    @staticmethod
    def _subtree(node: _Node, out: list[Message], *, skip_dollar: bool, include_self: bool) -> None:
        if include_self and node.message is not None:
            out.append(node.message)
        stack = [child for name, child in node.children.items() if not (skip_dollar and name.startswith("$"))]
        while stack:
            current = stack.pop()
            if current.message is not None:
                out.append(current.message)
            stack.extend(current.children.values())

    def _delete(self, topic: str) -> None:
        old = self._by_topic.pop(topic, None)
        if old is None:
            return
        self._bytes -= size_of(old)
        self._expiring.discard(topic)
        levels = topic.split("/")
        path = [self._root]
        for level in levels:
            path.append(path[-1].children[level])
        path[-1].message = None
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.message is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]
