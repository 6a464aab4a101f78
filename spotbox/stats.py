"""The last hour of ingest in memory: per-minute buckets of received, valid and rejected counts, per robot."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 3600
BUCKET_S = 60
# A bound on memory whatever serials robots invent: beyond it a minute counts in the totals only.
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
    robots: dict[str, Counts] = field(default_factory=dict)


class StatsWindow:
    """A sliding window of `window_s` seconds made of `bucket_s` buckets; expired buckets are dropped."""

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

    def count(self, serial: str | None, rejected_field: str | None) -> None:
        """Count one status of robot `serial` (None: not a valid serial, counted in the totals only)."""
        bucket = self._current()
        bucket.total.count(rejected_field)
        if serial is None:
            return
        robot = bucket.robots.get(serial)
        if robot is None:
            if len(bucket.robots) >= self._max_robots:
                return
            robot = bucket.robots[serial] = Counts()
        robot.count(rejected_field)

    def snapshot(self) -> dict[str, Any]:
        """The window summed over its buckets: totals, then per robot, as /stats shows it."""
        self._expire(self._index())
        total = Counts()
        robots: dict[str, Counts] = {}
        for bucket in self._buckets:
            total.add(bucket.total)
            for serial, counts in bucket.robots.items():
                robots.setdefault(serial, Counts()).add(counts)
        return {
            "window_s": self.window_s,
            **total.to_api(),
            "robots": {serial: robots[serial].to_api() for serial in sorted(robots)},
        }

    @property
    def bucket_count(self) -> int:
        """Buckets held right now (at most window_s / bucket_s)."""
        return len(self._buckets)

    def _index(self) -> int:
        return int(self._clock() // self._bucket_s)

    def _expire(self, index: int) -> None:
        while self._buckets and self._buckets[0].index <= index - self._span:
            self._buckets.popleft()

    def _current(self) -> _Bucket:
        index = self._index()
        if not self._buckets or self._buckets[-1].index != index:
            self._expire(index)
            self._buckets.append(_Bucket(index))
        return self._buckets[-1]
