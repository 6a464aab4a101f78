"""Alerts with a lifecycle: rules evaluated on committed statuses, rejections, presence changes and a clock tick.

Two axes, as operators know them from ThingsBoard: `state` is pending (condition true, its duration not yet met),
active, or cleared (past its clear level); `acknowledged` is set by a user (who and when kept), before or after it
clears. Every change is a `Transition`. An alert that would become active again after clearing is a new alert.
A threshold alert ends only at its clear level: a value between the threshold and the clear level keeps a pending
alert maturing and an active one active, so a battery wavering around 20% opens one alert, not one a minute.
"""

from __future__ import annotations

import logging
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, cast

from spotbox.ops.presence import RobotPresence, State, utc_now
from spotbox.ops.rules import Rule
from spotbox.status import StoredStatus

logger = logging.getLogger(__name__)

AlertState = Literal["pending", "active", "cleared"]
ALERT_STATES: tuple[AlertState, ...] = ("pending", "active", "cleared")
# The acknowledgement is recorded as a transition between these two pseudo-states.
UNACKNOWLEDGED, ACKNOWLEDGED = "unacknowledged", "acknowledged"


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of an alert: when, from what, to what, and who (for an acknowledgement)."""

    at: datetime
    from_state: str | None
    to_state: str
    by: str | None = None

    def to_api(self) -> dict[str, Any]:
        """The transition as the API shows it."""
        return {"at": self.at, "from": self.from_state, "to": self.to_state, "by": self.by}


@dataclass(slots=True)
class Alert:
    """One alert of one rule on one robot."""

    id: str
    rule: str
    serial_number: str
    severity: str
    state: AlertState
    created_at: datetime
    updated_at: datetime
    message: str
    value: float | None = None
    acknowledged: bool = False
    ack_by: str | None = None
    ack_at: datetime | None = None
    activated_at: datetime | None = None
    cleared_at: datetime | None = None
    history: list[Transition] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        """Shown in the console's open list: pending, active, or once active, cleared but not acknowledged."""
        if self.state != "cleared":
            return True
        return not self.acknowledged and self.activated_at is not None

    def to_api(self) -> dict[str, Any]:
        """The alert as the API, the feeds, MQTT and the webhook show it."""
        return {
            "id": self.id,
            "rule": self.rule,
            "serial_number": self.serial_number,
            "severity": self.severity,
            "state": self.state,
            "acknowledged": self.acknowledged,
            "acknowledged_by": self.ack_by,
            "acknowledged_at": self.ack_at,
            "created_at": self.created_at,
            "activated_at": self.activated_at,
            "cleared_at": self.cleared_at,
            "updated_at": self.updated_at,
            "value": self.value,
            "message": self.message,
            "open": self.is_open,
            "history": [transition.to_api() for transition in self.history],
        }


class OpenAlerts(MutableMapping[str, Alert]):
    """The open alerts by id, and the same by robot: a robot's open alerts are read on every change of one of
    them (its retained MQTT message), and a fleet may have an alert open on every robot, where a scan of all of
    them per change cost O(robots)."""

    def __init__(self) -> None:
        self._by_id: dict[str, Alert] = {}
        self._by_serial: dict[str, dict[str, Alert]] = {}

    def of_robot(self, serial: str) -> Iterable[Alert]:
        """The open alerts of one robot."""
        return self._by_serial.get(serial, {}).values()

    def __getitem__(self, alert_id: str) -> Alert:
        return self._by_id[alert_id]

    def __setitem__(self, alert_id: str, alert: Alert) -> None:
        if alert_id in self._by_id:
            del self[alert_id]
        self._by_id[alert_id] = alert
        self._by_serial.setdefault(alert.serial_number, {})[alert_id] = alert

    def __delitem__(self, alert_id: str) -> None:
        alert = self._by_id.pop(alert_id)
        robot = self._by_serial[alert.serial_number]
        del robot[alert_id]
        if not robot:
            del self._by_serial[alert.serial_number]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def clear(self) -> None:
        self._by_id.clear()
        self._by_serial.clear()


class Measured(Protocol):
    """What the value rules read of a committed status: a StatusRecord, a StatusRow, or a narrower row."""

    @property
    def serial_number(self) -> str: ...
    @property
    def received_at(self) -> datetime: ...
    @property
    def battery_level(self) -> int: ...
    @property
    def latitude(self) -> float: ...
    @property
    def longitude(self) -> float: ...
    @property
    def height(self) -> float: ...


# Called with the alert and the transition just applied to it.
AlertListener = Callable[[Alert, Transition], None]


# A rejection window is kept in this many slots of equal width (5 s for the default 300 s): a robot's window costs
# about 1 KB whatever its rate and the window's length. (A bucket per second cost about 125 bytes per robot-second:
# 375 MB for 10,000 robots publishing once a second over 300 s.)
WINDOW_SLOTS = 60


@dataclass(slots=True)
class _Window:
    """Statuses received and rejected over a sliding window of `seconds`, in WINDOW_SLOTS slots, with running sums.

    The window covers the newest slot and the WINDOW_SLOTS - 1 before it, so a status counts for between
    `seconds` minus one slot's width and `seconds`.
    """

    seconds: float
    width: float = 0.0
    newest: int = -(2**62)  # the slot number (`timestamp // width`) of the newest slot
    slot_seen: array[int] = field(default_factory=lambda: array("I", bytes(4 * WINDOW_SLOTS)))
    slot_rejected: array[int] = field(default_factory=lambda: array("I", bytes(4 * WINDOW_SLOTS)))
    seen: int = 0
    rejected: int = 0

    def __post_init__(self) -> None:
        self.width = self.seconds / WINDOW_SLOTS

    def add(self, at: datetime, rejected: bool) -> None:
        slot = int(at.timestamp() // self.width)
        if slot > self.newest:
            self._advance(slot)
        # A receive time older than the newest slot (the clock stepped back) counts in the newest slot.
        index = max(slot, self.newest) % WINDOW_SLOTS
        self.slot_seen[index] += 1
        self.slot_rejected[index] += rejected
        self.seen += 1
        self.rejected += rejected

    def slide(self, now: datetime) -> None:
        slot = int(now.timestamp() // self.width)
        if slot > self.newest:
            self._advance(slot)

    def _advance(self, slot: int) -> None:
        """Make `slot` the newest: the slots it pushes out of the window are emptied."""
        for expired in range(max(self.newest + 1, slot - WINDOW_SLOTS + 1), slot + 1):
            index = expired % WINDOW_SLOTS
            self.seen -= self.slot_seen[index]
            self.rejected -= self.slot_rejected[index]
            self.slot_seen[index] = self.slot_rejected[index] = 0
        self.newest = slot


class AlertEngine:
    """Evaluates the rules and keeps the alerts that are not over: `current` (pending or active, one per rule and
    robot) and `open` (what the console lists, cleared but unacknowledged ones included)."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        clock: Callable[[], datetime] = utc_now,
        registered: Callable[[str], bool] = lambda serial: True,
    ) -> None:
        self.rules = tuple(rule for rule in rules if rule.enabled)
        self.clock = clock
        self.registered = registered
        self.current: dict[tuple[str, str], Alert] = {}
        self.open = OpenAlerts()
        self.listeners: list[AlertListener] = []
        self._threshold = tuple(rule for rule in self.rules if rule.kind == "threshold")
        self._presence = tuple(rule for rule in self.rules if rule.kind == "presence")
        self._rejections = tuple(rule for rule in self.rules if rule.kind == "rejections")
        self._unregistered = tuple(rule for rule in self.rules if rule.kind == "unregistered")
        self._windows: dict[tuple[str, str], _Window] = {}
        # False on an instance that leaves the rules to another one sharing the database (spotbox/cluster/ops.py):
        # inputs are then ignored, and the alerts are those `follow` is given.
        self.evaluating = True
        self._by_name = {rule.name: rule for rule in self.rules}

    def load(self, alerts: Iterable[Alert], *, replace: bool = False) -> None:
        """Take up the alerts that were open when spotbox stopped (read back from the database); with `replace`,
        in place of those held (an instance taking over the evaluation)."""
        if replace:
            self.current.clear()
            self.open.clear()
        for alert in alerts:
            if alert.is_open:
                self.open[alert.id] = alert
            if alert.state != "cleared":
                self.current[(alert.rule, alert.serial_number)] = alert

    # ---- inputs ---------------------------------------------------------------------------------------------

    def on_statuses(self, rows: Iterable[StoredStatus]) -> None:
        """Evaluate the value rules on committed statuses."""
        self.on_records(row.record for row in rows)

    def on_records(self, records: Iterable[Measured]) -> None:
        """Evaluate the value rules on committed statuses (their records, or their rows as read back).

        This runs for every committed status, so the common case (nothing wrong, no alert open) is kept to a few
        comparisons and dictionary probes per rule.
        """
        if not self.evaluating:
            return
        current = self.current
        for record in records:
            serial = record.serial_number
            now = record.received_at
            for rule in self._threshold:
                value = float(getattr(record, rule.field or "battery_level"))
                opens = rule.opens(value)
                if opens or (rule.name, serial) in current:
                    self._evaluate(rule, serial, True if opens else False if rule.clears(value) else None, value, now)
            for rule in self._rejections:
                window = self._window(rule, serial)
                window.add(now, False)
                # Nothing rejected in the window and no alert open: nothing can change.
                if window.rejected or (rule.name, serial) in current:
                    self._judge_window(rule, serial, window, now)
            for rule in self._unregistered:
                if not self.registered(serial) or (rule.name, serial) in current:
                    self._evaluate(rule, serial, not self.registered(serial), None, now)

    def on_rejection(self, serial: str, at: datetime) -> None:
        """Evaluate the rejection rules on a refused status."""
        if not self.evaluating:
            return
        for rule in self._rejections:
            self._count(rule, serial, at, rejected=True)

    def on_presence(self, robot: RobotPresence, before: State) -> None:
        """Evaluate the presence rules on a change of presence."""
        serial, state = robot.serial_number, robot.state
        if not self.evaluating:
            return
        for rule in self._presence:
            if state == "unknown":
                continue
            self._evaluate(rule, serial, state in rule.states, None, robot.since, f"robot is {state}")

    def on_registered(self, serial: str) -> None:
        """A robot was registered (or deregistered): the unknown-robot rule follows."""
        if not self.evaluating:
            return
        now = self.clock()
        for rule in self._unregistered:
            if (rule.name, serial) in self.current:
                self._evaluate(rule, serial, not self.registered(serial), None, now)

    def tick(self) -> None:
        """The time rules: pending alerts whose duration has passed become active; rejection windows slide.

        A fleet may have an alert open on every robot, so this looks at each current alert once, with one
        comparison unless it has something to do, and only at the windows of robots with a rejection alert.
        """
        if not self.evaluating:
            return
        now = self.clock()
        matured: list[tuple[Rule, Alert]] = []
        judged: list[tuple[Rule, str]] = []
        for (name, serial), alert in self.current.items():
            rule = self._by_name.get(name)
            if rule is None:
                continue
            if alert.state == "pending" and (now - alert.created_at).total_seconds() >= rule.for_s:
                matured.append((rule, alert))
            if rule.kind == "rejections":
                judged.append((rule, serial))
        for rule, alert in matured:
            self._evaluate(rule, alert.serial_number, None, alert.value, now)
        for rule, serial in judged:
            window = self._windows.get((rule.name, serial))
            if window is not None and (rule.name, serial) in self.current:
                window.slide(now)
                self._judge_window(rule, serial, window, now)

    def acknowledge(self, alert: Alert, by: str | None, at: datetime | None = None) -> Transition | None:
        """Record that `by` (None without --users) acknowledged the alert (at `at`, or now); None when it already
        was."""
        if alert.acknowledged:
            return None
        now = at or self.clock()
        alert.acknowledged = True
        alert.ack_by = by
        alert.ack_at = now
        transition = Transition(now, UNACKNOWLEDGED, ACKNOWLEDGED, by)
        if not alert.is_open:
            self.open.pop(alert.id, None)
        self._emit(alert, transition)
        return transition

    def follow(self, stored: Alert, transition: Transition) -> Alert:
        """Apply a change another instance made (`stored`: its alert as the database holds it now): the alert
        held here moves as that instance's did, and is returned; nothing is told to the listeners (the instance
        that made the change told the world)."""
        alert = self.open.get(stored.id) or self.current.get((stored.rule, stored.serial_number))
        if alert is None or alert.id != stored.id:
            if alert is not None:
                # This instance's alert of that rule and robot lost to the stored one (see `discard`).
                self.discard(alert)
            alert = _as_before(stored, transition)
        if transition.to_state in ALERT_STATES:
            state: AlertState = transition.to_state
            alert.state = state
            alert.updated_at = transition.at
            if state == "active":
                alert.activated_at = transition.at
            elif state == "cleared":
                alert.cleared_at = transition.at
        else:
            alert.acknowledged, alert.ack_by, alert.ack_at = True, transition.by, transition.at
        alert.value = stored.value
        alert.history.append(transition)
        key = (alert.rule, alert.serial_number)
        if alert.state != "cleared":
            self.current[key] = alert
        elif self.current.get(key) is alert:
            del self.current[key]
        if alert.is_open:
            self.open[alert.id] = alert
        else:
            self.open.pop(alert.id, None)
        return alert

    def discard(self, alert: Alert) -> None:
        """Forget an alert the database did not keep (another instance had one of its rule and robot first)."""
        key = (alert.rule, alert.serial_number)
        if self.current.get(key) is alert:
            del self.current[key]
        self.open.pop(alert.id, None)

    def open_alerts(self, serial: str | None = None) -> list[Alert]:
        """The open alerts (of one robot), newest first."""
        alerts = self.open.values() if serial is None else self.open.of_robot(serial)
        return sorted(alerts, key=lambda a: (a.created_at, a.id), reverse=True)

    # ---- the lifecycle --------------------------------------------------------------------------------------

    def _window(self, rule: Rule, serial: str) -> _Window:
        window = self._windows.get((rule.name, serial))
        if window is None:
            window = self._windows[(rule.name, serial)] = _Window(rule.window_s)
        return window

    def _count(self, rule: Rule, serial: str, at: datetime, *, rejected: bool) -> None:
        window = self._window(rule, serial)
        window.add(at, rejected)
        self._judge_window(rule, serial, window, at)

    def _judge_window(self, rule: Rule, serial: str, window: _Window, now: datetime) -> None:
        if window.seen < rule.min_seen:
            # Too few statuses to judge an open alert by; a silent robot is for the presence rules.
            condition = None if window.seen else False
            self._evaluate(rule, serial, condition, None, now)
            return
        ratio = window.rejected / window.seen
        condition = True if rule.opens(ratio) else False if rule.clears(ratio) else None
        self._evaluate(rule, serial, condition, round(ratio, 4), now)

    def _evaluate(
        self, rule: Rule, serial: str, condition: bool | None, value: float | None, now: datetime, message: str = ""
    ) -> None:
        """Move the alert of (rule, robot): True opens or matures it, False clears it, None keeps it as it is."""
        key = (rule.name, serial)
        alert = self.current.get(key)
        if alert is None:
            if not condition:
                return
            alert = Alert(
                str(uuid.uuid4()), rule.name, serial, rule.severity, "pending", now, now,
                message or _message(rule, value), value,
            )  # fmt: skip
            self.current[key] = alert
            self.open[alert.id] = alert
            self._change(alert, "pending", now)
        elif value is not None:
            alert.value = value
        if condition is False:
            self._change(alert, "cleared", now)
            del self.current[key]
            if not alert.is_open:
                self.open.pop(alert.id, None)
            return
        if alert.state == "pending" and (now - alert.created_at).total_seconds() >= rule.for_s:
            alert.activated_at = now
            self._change(alert, "active", now)

    def _change(self, alert: Alert, state: AlertState, now: datetime) -> None:
        transition = Transition(now, None if alert.state == state else alert.state, state)
        alert.state = state
        alert.updated_at = now
        if state == "cleared":
            alert.cleared_at = now
        logger.info(
            "alert %s %s on %s: %s", alert.rule, state, alert.serial_number, alert.message,
            extra={"event": "alert", "alert_id": alert.id, "state": state},
        )  # fmt: skip
        self._emit(alert, transition)

    def _emit(self, alert: Alert, transition: Transition) -> None:
        alert.history.append(transition)
        for listener in self.listeners:
            try:
                listener(alert, transition)
            except Exception:
                logger.exception("alert listener failed for alert %s", alert.id)


def _as_before(stored: Alert, transition: Transition) -> Alert:
    """An alert first heard of through `transition`: its stored row as it was before that transition."""
    alert = stored
    alert.history = [h for h in alert.history if h.at < transition.at]
    if transition.to_state in ALERT_STATES:
        alert.state = cast(AlertState, transition.from_state or transition.to_state)
        alert.cleared_at = None
        if alert.state == "pending":
            alert.activated_at = None
    else:
        alert.acknowledged, alert.ack_by, alert.ack_at = False, None, None
    return alert


def _message(rule: Rule, value: float | None) -> str:
    if rule.kind == "threshold":
        side = f"below {rule.below:g}" if rule.below is not None else f"above {rule.above:g}"
        return f"{rule.field} {value:g} is {side}"
    if rule.kind == "rejections":
        return f"{(value or 0) * 100:.0f}% of statuses rejected over {rule.window_s:g} s"
    if rule.kind == "unregistered":
        return "robot publishes but is not registered"
    return rule.name
