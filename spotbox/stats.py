"""The last hour of ingest in memory: per-minute buckets of received, valid and rejected counts, per robot."""

from __future__ import annotations

import time
from array import array
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from spotbox.status import is_valid_serial

WINDOW_S = 3600
BUCKET_S = 60
# A bound on memory whatever serials robots invent: beyond it a robot counts in the totals only.
MAX_ROBOTS_PER_BUCKET = 10_000


@dataclass(slots=True)
class Counts:
    """Received, valid and rejected (by the failing field) statuses."""

    received: int = 0
    valid: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)

    def count(self, rejected_field: str | None) -> None:
        """Count one status: valid when `rejected_field` is None."""
        self.received += 1
        if rejected_field is None:
            self.valid += 1
        else:
            self.rejected_by_reason[rejected_field] += 1

    def add(self, other: Counts) -> None:
        """Add another bucket's counts to these."""
        self.received += other.received
        self.valid += other.valid
        self.rejected_by_reason.update(other.rejected_by_reason)

    def to_api(self) -> dict[str, Any]:
        """The JSON shape of /stats, for the fleet or one robot."""
        return {
            "received": self.received,
            "valid": self.valid,
            "rejected": self.rejected_by_reason.total(),
            "rejected_by_reason": dict(self.rejected_by_reason),
        }


@dataclass(slots=True)
class _Bucket:
    index: int
    total: Counts = field(default_factory=Counts)


class _Robot:
    """One robot's hour: received and valid counts in a ring of per-minute slots (two 32-bit integers a minute),
    their sums over the ring, and its rejections by field, kept only for the minutes that have any."""

    __slots__ = ("counts", "last", "received", "rejected", "valid")

    def __init__(self, span: int, index: int) -> None:
        self.counts = array("I", bytes(8 * span))  # slot i: received at 2i, valid at 2i + 1
        self.last = index
        # The sums of the ring's slots: a snapshot of a robot heard from this minute reads them, not 60 slots
        # (at 10,000 robots, 92 ms of the event loop for each /stats and each save of the cluster's window).
        self.received = 0
        self.valid = 0
        self.rejected: dict[int, Counter[str]] | None = None

    def count(self, span: int, index: int, rejected_field: str | None) -> None:
        counts = self.counts
        if index != self.last:
            # Clear the slots of the minutes skipped since the last count (all of them after an hour or more).
            for skipped in range(max(self.last + 1, index - span + 1), index + 1):
                slot = skipped % span
                self.received -= counts[2 * slot]
                self.valid -= counts[2 * slot + 1]
                counts[2 * slot] = counts[2 * slot + 1] = 0
            self.last = index
            if self.rejected is not None:
                self.rejected = {i: c for i, c in self.rejected.items() if i > index - span} or None
        slot = index % span
        counts[2 * slot] += 1
        self.received += 1
        if rejected_field is None:
            counts[2 * slot + 1] += 1
            self.valid += 1
            return
        if self.rejected is None:
            self.rejected = {}
        self.rejected.setdefault(index, Counter())[rejected_field] += 1

    def to_json(self, span: int, now: int) -> str | None:
        """The /stats JSON of its counts in the minutes after `now - span`; None when it sent nothing in them.

        Written as text, not built as dicts: at 10,000 robots a snapshot through objects held the event loop 16 ms
        (each /stats, and every 2 s on PostgreSQL to share the window), and its 20,000 dicts set off the garbage
        collector's young collections, which then walked them (30 to 40 ms every 2 s with a lower threshold).
        """
        received = self.received
        valid = self.valid
        # The ring holds the minutes up to `last`; those up to `now - span` have left the window since.
        gone = min(now - span, self.last)
        if gone > self.last - span:
            counts = self.counts
            for index in range(self.last - span + 1, gone + 1):
                slot = index % span
                received -= counts[2 * slot]
                valid -= counts[2 * slot + 1]
        if not received:
            return None
        rejected = 0
        by_reason = "{}"
        if self.rejected is not None:
            reasons: Counter[str] = Counter()
            for index, by_field in self.rejected.items():
                if index > now - span:
                    reasons.update(by_field)
            if reasons:
                rejected = reasons.total()
                by_reason = orjson.dumps(reasons).decode()
        return f'{{"received":{received},"valid":{valid},"rejected":{rejected},"rejected_by_reason":{by_reason}}}'


class StatsWindow:
    """A sliding window of `window_s` seconds made of `bucket_s` buckets; expired buckets are dropped.

    Per robot it costs a ring of two 32-bit counters a bucket (480 bytes an hour, about 700 with the objects
    around it: about 12 bytes a robot-minute, 7 MB for 10,000 robots), plus its rejections by field for the
    buckets that have any. At most `max_robots` robots are itemised; more count in the totals only.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        window_s: int = WINDOW_S,
        bucket_s: int = BUCKET_S,
        max_robots: int = MAX_ROBOTS_PER_BUCKET,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._bucket_s = bucket_s
        self._span = window_s // bucket_s
        self._max_robots = max_robots
        self._buckets: deque[_Bucket] = deque()
        self._robots: dict[str, _Robot] = {}

    def count(self, serial: str | None, rejected_field: str | None) -> None:
        """Count one status of robot `serial` (None: not a valid serial, counted in the totals only)."""
        bucket = self._current()
        bucket.total.count(rejected_field)
        if serial is None:
            return
        robot = self._robots.get(serial)
        if robot is None:
            if len(self._robots) >= self._max_robots or not is_valid_serial(serial):
                return
            robot = self._robots[serial] = _Robot(self._span, bucket.index)
        robot.count(self._span, bucket.index, rejected_field)

    def snapshot(self) -> dict[str, Any]:
        """The window summed over its buckets: totals, then per robot, as /stats shows it."""
        return cast(dict[str, Any], orjson.loads(self.snapshot_json()))

    def snapshot_json(self) -> bytes:
        """`snapshot` as the JSON /stats answers with."""
        now = self._index()
        self._expire(now)
        total = Counts()
        for bucket in self._buckets:
            total.add(bucket.total)
        span = self._span
        robots = self._robots
        # Serials are itemised only when valid (`count`): letters, digits, "_", "." and "-" need no escaping.
        listed = ",".join(
            f'"{serial}":{counts}'
            for serial in sorted(robots)
            if (counts := robots[serial].to_json(span, now)) is not None
        )
        head = orjson.dumps({"window_s": self.window_s, **total.to_api()})
        return head[:-1] + b',"robots":{' + listed.encode() + b"}}"

    @property
    def bucket_count(self) -> int:
        """Buckets held right now (at most window_s / bucket_s)."""
        return len(self._buckets)

    @property
    def robot_count(self) -> int:
        """Robots itemised right now (at most max_robots)."""
        return len(self._robots)

    def _index(self) -> int:
        return int(self._clock() // self._bucket_s)

    def _expire(self, index: int) -> None:
        while self._buckets and self._buckets[0].index <= index - self._span:
            self._buckets.popleft()
        # Robots silent for the whole window are forgotten.
        for serial in [serial for serial, robot in self._robots.items() if robot.last <= index - self._span]:
            del self._robots[serial]

    def _current(self) -> _Bucket:
        index = self._index()
        if not self._buckets or self._buckets[-1].index != index:
            self._expire(index)
            self._buckets.append(_Bucket(index))
        return self._buckets[-1]
