"""Presence: each robot is online, stale or offline (unknown just after a restart).

Online while the MQTT connection that last published the robot's status is up (for HTTP ingest, while statuses
keep arriving); stale when no status came for the stale-after time (by default three times the median gap of its
last 10 statuses, at least 10 s); offline once that connection ended or after the offline-after time. Durations
run on spotbox's receive clock. Three calls feed it:

- `status_committed(serial, received_at)`: a status of `serial` was committed (the ingest pipeline's fan-out
  calls it for every committed row, whatever the transport);
- `bind(serial, connection)`: the broker, once that status is committed: it came over `connection` (any hashable
  object standing for the MQTT connection; spotbox/mqtt passes its Connection);
- `connection_closed(connection)`: that connection ended, cleanly or not.

Instances sharing a PostgreSQL database also hear of each other's statuses (`seen_elsewhere`) and connection ends
(`ended_elsewhere`), read from the database by spotbox/cluster/ops.py.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

logger = logging.getLogger(__name__)

State = Literal["online", "stale", "offline", "unknown"]
STATES: tuple[State, ...] = ("online", "stale", "offline", "unknown")
STALE_FLOOR_S = 10.0
STALE_FACTOR = 3
GAPS_KEPT = 10


@dataclass(slots=True)
class RobotPresence:
    """One robot's presence and what it is computed from."""

    serial_number: str
    state: State
    since: datetime
    last_seen: datetime | None = None
    connection: object | None = None
    gaps: deque[float] = field(default_factory=lambda: deque(maxlen=GAPS_KEPT))

    def to_api(self) -> dict[str, object]:
        """`presence` and `presence_since` as the API shows them."""
        return {"presence": self.state, "presence_since": self.since}


# Called with (robot, state before) on every change of state.
Listener = Callable[[RobotPresence, State], None]


def utc_now() -> datetime:
    """The receive clock: now, in UTC."""
    return datetime.now(UTC)


class Presence:
    """Every robot's presence, moved by statuses, connection ends and a clock tick (`tick`)."""

    def __init__(
        self,
        *,
        stale_after_s: float | None = None,
        offline_after_s: float = 300.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self.clock = clock
        self.started_at = clock()
        self.robots: dict[str, RobotPresence] = {}
        self.listeners: list[Listener] = []
        # Told of each robot a connection end made offline (instances sharing a database record it for the others).
        self.ended_listeners: list[Callable[[RobotPresence], None]] = []
        self._by_connection: dict[object, set[str]] = {}

    def stale_after(self, robot: RobotPresence) -> float:
        """Seconds without a status before `robot` is stale: the setting, or 3 x its median gap (at least 10 s)."""
        if self.stale_after_s is not None:
            return self.stale_after_s
        if len(robot.gaps) < 2:
            return STALE_FLOOR_S
        return max(STALE_FLOOR_S, STALE_FACTOR * statistics.median(robot.gaps))

    @property
    def shortest_stale_after(self) -> float:
        """The shortest stale-after time any robot can have: the setting, or the floor of the automatic one."""
        return self.stale_after_s if self.stale_after_s is not None else STALE_FLOOR_S

    def seed(self, serials: Iterable[tuple[str, datetime | None]]) -> None:
        """Robots known before this start (stored or registered), with when each was last seen: unknown for now."""
        for serial, last_seen in serials:
            if serial not in self.robots:
                self.robots[serial] = RobotPresence(serial, "unknown", self.started_at, last_seen)

    def forget(self, serial: str) -> None:
        """Drop a robot (deregistered and never seen)."""
        robot = self.robots.pop(serial, None)
        if robot is not None and robot.connection is not None:
            self._by_connection.get(robot.connection, set()).discard(serial)

    def status_committed(self, serial: str, received_at: datetime, connection: object | None = None) -> None:
        """A status of `serial` received at `received_at` is committed, published over `connection` (or None)."""
        robot = self.robots.get(serial)
        if robot is None:
            robot = self.robots[serial] = RobotPresence(serial, "unknown", received_at)
        if robot.last_seen is None or received_at > robot.last_seen:
            if robot.last_seen is not None and robot.state != "unknown":
                robot.gaps.append((received_at - robot.last_seen).total_seconds())
            robot.last_seen = received_at
        if connection is not None:
            self.bind(serial, connection)
        self._move(robot, "online", received_at)

    def seen_elsewhere(self, serial: str, received_at: datetime) -> None:
        """A status of `serial` committed by another instance sharing the database (or by this one, read back).

        Only a status newer than the last one known counts: then the robot's latest status did not come over the
        connection it may have here, so that connection's end no longer makes it offline (a robot that moved to
        another instance does not flap when its old connection times out here).
        """
        robot = self.robots.get(serial)
        if robot is not None and robot.last_seen is not None and received_at <= robot.last_seen:
            return
        if robot is not None and robot.connection is not None:
            self._by_connection.get(robot.connection, set()).discard(serial)
            robot.connection = None
        now = self.clock()
        silent = (now - received_at).total_seconds()
        if silent < self.offline_after_s and silent < self.shortest_stale_after:
            self.status_committed(serial, received_at)
            return
        # Received long enough ago to be past the time rules (an instance reading the table after an outage of its
        # own): the robot goes straight to the state that age gives it. Through status_committed it was online
        # until the next tick, and every listener (presence alerts included) heard it go online, then offline.
        if robot is None:
            robot = self.robots[serial] = RobotPresence(serial, "unknown", received_at)
        if robot.last_seen is not None and robot.state != "unknown":
            robot.gaps.append((received_at - robot.last_seen).total_seconds())
        robot.last_seen = received_at
        if silent >= self.offline_after_s:
            self._move(robot, "offline", now)
        elif silent >= self.stale_after(robot):
            self._move(robot, "stale", now)
        else:
            self._move(robot, "online", received_at)

    def ended_elsewhere(self, serial: str, at: datetime, last_seen: datetime | None) -> None:
        """Another instance saw the robot's connection end at `at`, its last status there received at
        `last_seen`: offline, unless a newer status came since (the robot went on elsewhere)."""
        robot = self.robots.get(serial)
        if robot is None or robot.connection is not None:
            return
        if last_seen is not None and robot.last_seen is not None and robot.last_seen > last_seen:
            return
        self._move(robot, "offline", at)

    def bind(self, serial: str, connection: object) -> None:
        """The robot's latest committed status came over `connection`: it is online while that is up."""
        robot = self.robots.get(serial)
        if robot is None or connection is robot.connection:
            return
        if robot.connection is not None:
            self._by_connection.get(robot.connection, set()).discard(serial)
        robot.connection = connection
        self._by_connection.setdefault(connection, set()).add(serial)

    def connection_closed(self, connection: object) -> None:
        """The connection ended: each robot whose last status came over it is offline from now."""
        serials = self._by_connection.pop(connection, set())
        for serial in serials:
            robot = self.robots.get(serial)
            if robot is not None and robot.connection is connection:
                robot.connection = None
                self._went_offline(robot)

    def committed_after_close(self, serial: str) -> None:
        """A status of `serial` was committed after the client it came from had left (a QoS 0 status, or a client
        that closed before its PUBACK): offline as its connection is, unless the robot is bound to a connection
        (that one's end decides, or a newer connection of the robot's is up)."""
        robot = self.robots.get(serial)
        if robot is not None and robot.connection is None:
            self._went_offline(robot)

    def _went_offline(self, robot: RobotPresence) -> None:
        if robot.state != "offline":
            self._move(robot, "offline", self.clock())
            for listener in self.ended_listeners:
                listener(robot)

    def tick(self) -> None:
        """Apply the time rules: online -> stale -> offline without statuses; unknown resolves after a start.

        Every robot is looked at each tick, so an online robot heard from within the shortest stale-after time
        costs one comparison: its own stale-after time (a median) is computed only once it could be past it.
        """
        now = self.clock()
        shortest = self.shortest_stale_after
        # Heard from after this, an online robot is neither stale nor offline: one comparison, no arithmetic (at
        # 10,000 robots the silence of each, as a timedelta, held the event loop 3 ms every tick).
        try:
            quiet_since = now - timedelta(seconds=min(shortest, self.offline_after_s))
        except OverflowError:  # times longer than datetime's range (`--stale-after inf`): no robot gets there
            quiet_since = datetime.min.replace(tzinfo=UTC)
        for robot in list(self.robots.values()):
            if robot.state == "online" and robot.last_seen is not None and robot.last_seen > quiet_since:
                continue
            silent = (now - robot.last_seen).total_seconds() if robot.last_seen is not None else None
            if robot.state == "unknown":
                stale_after = self.stale_after(robot)
                if (now - self.started_at).total_seconds() < stale_after:
                    continue
                if silent is None or silent >= self.offline_after_s:
                    self._move(robot, "offline", now)
                else:
                    self._move(robot, "stale", now)
            elif silent is not None and silent >= self.offline_after_s:
                self._move(robot, "offline", now)
            elif (
                robot.state == "online"
                and silent is not None
                and silent >= shortest
                and silent >= self.stale_after(robot)
            ):
                self._move(robot, "stale", now)

    def counts(self) -> Counter[str]:
        """How many robots are in each state."""
        return Counter(robot.state for robot in self.robots.values())

    def _move(self, robot: RobotPresence, state: State, at: datetime) -> None:
        if robot.state == state:
            return
        before = robot.state
        robot.state = state
        robot.since = at
        logger.info("robot %s is %s (was %s)", robot.serial_number, state, before)
        for listener in self.listeners:
            try:
                listener(robot, before)
            except Exception:
                logger.exception("presence listener failed for %s", robot.serial_number)
