"""Presence and alerts across instances sharing one PostgreSQL database.

Every instance commits statuses to one table, so every instance can know every robot: the database is the source,
`LISTEN/NOTIFY` (through the RowSource's connection) only wakes the readers here.

- **Presence.** Each instance reads the rows committed after its cursor (id order is commit order) and hands each
  robot's receive times to its Presence (`seen_elsewhere`): a robot publishing through instance B is online on A,
  and goes stale and offline on A's own clock after its silence. Its own rows are not read back: they reach
  Presence at commit, and the cursor follows them while their ids continue it. The end of a robot's MQTT
  connection is seen only by the instance that held it: that instance records it (`presence_event`), and the
  others mark the robot offline unless a newer status came since (a robot that moved on does not flap).
- **Alerts.** One instance evaluates the rules for all: the one holding the session advisory lock
  `ALERT_EVALUATOR_LOCK` on a connection of its own, keyed by its schema too (advisory locks are the whole
  database's: deployments in two schemas of one database each have their evaluator). It evaluates the value
  rules on every instance's rows in commit order (so "the robot's last status" is the same one whichever
  instance received it), the rejection rule
  on every instance's rejections (read from the rejection table, written like alert changes under
  `OPS_ORDER_LOCK`), and the time rules (stale, offline, pending
  durations) on one timer. Its changes go to the database, and once committed to the webhook and upstream; the
  other instances read each transition written by another (`alert_transition.writer`), move their copy of the
  alert the same way and send it on their feeds. If it stops, its lock goes with its connection and another
  instance takes over, starting from the alerts stored. Acknowledging is one conditional UPDATE, on any instance,
  of the acknowledgement alone: only the evaluator writes an alert's state.
  The unique index `alert_one_current` keeps one alert in progress per rule and robot even if two instances
  believe for a moment that they evaluate (a database restart): the second's is not stored and not told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from spotbox.errors import StorageError
from spotbox.ops.presence import RobotPresence
from spotbox.ops.service import Operations
from spotbox.ops.store import last_transition_id, load_registry, load_unfinished, transitions_after
from spotbox.status import StoredStatus, is_valid_serial
from spotbox.storage.postgres import ALERT_EVALUATOR_LOCK, OPS_CHANNEL, OPS_ORDER_LOCK, PostgresStorage

logger = logging.getLogger(__name__)

# Rows read at once when catching up.
_PAGE = 2000
# Without a wake-up, read anyway this often (rejections are not announced; a lost notification is not fatal).
_POLL_S = 1.0
_RETRY_S = 1.0
# Connection ends kept for the other instances to read.
_CONNECTION_ENDS_KEPT = 10_000


class Reading(NamedTuple):
    """What the evaluator reads of each committed status: what Presence and the value rules use."""

    id: int
    serial_number: str
    received_at: datetime
    battery_level: int
    latitude: float
    longitude: float
    height: float


_READINGS = (
    "SELECT id, serial_number, received_at, battery_level, latitude, longitude, height FROM status "
    "WHERE id > $1 ORDER BY id LIMIT $2"
)
# A snapshot sees a prefix of the ids (they are in commit order), so max(id) is where the next read starts.
_LAST_SEEN = "SELECT serial_number, max(received_at), max(id) FROM status WHERE id > $1 GROUP BY serial_number"


def ops_first(storage: PostgresStorage, kind: str) -> list[tuple[str, Sequence[Any]]]:
    """The statement that opens each transaction of operations changes: taken in one order across instances (a
    reader's cursor never passes a change still in flight), and announced to the others on commit."""
    return [
        (
            "SELECT pg_advisory_xact_lock($1), pg_notify($2, $3)",
            [OPS_ORDER_LOCK, OPS_CHANNEL, f"{kind} {storage.writer_tag}"],
        )
    ]


class SharedOps:
    """Keeps this instance's presence and alerts in step with every instance sharing the database."""

    def __init__(
        self, ops: Operations, storage: PostgresStorage, *, retry_s: float = _RETRY_S, poll_s: float = _POLL_S
    ) -> None:
        self.ops = ops
        self.storage = storage
        self.retry_s = retry_s
        self.poll_s = poll_s
        self.evaluator = False
        # The last status row, alert transition, rejection and connection end read.
        self.row_id = 0
        self.transition_id = 0
        self.rejection_id = 0
        self.presence_id = 0
        self._behind = False
        self._registry_changed = False
        self._announce_registry = False
        self._wake = asyncio.Event()
        self._lock_conn: asyncpg.Connection | None = None
        self._ended: list[tuple[str, datetime, datetime | None]] = []
        self._ended_wake = asyncio.Event()
        ops.alerts.evaluating = False
        ops.evaluate_statuses = self.committed
        ops.evaluate_rejection = lambda serial, at: None  # read back from the rejection table by the evaluator
        ops.registry_saved = self._registry_saved
        ops.writer.first = ops_first(storage, "alert")
        # Rejections too are read by the evaluator after a cursor: their ids in commit order, and a wake-up.
        ops.rejections.first = ops_first(storage, "rejection")
        ops.writer.writer = storage.writer_tag
        ops.presence.ended_listeners.append(self._connection_ended)

    # ---- start ----------------------------------------------------------------------------------------------

    async def read_ends(self) -> None:
        """Read where each record ends now (before Operations reads what is stored, so nothing falls between)."""
        self.row_id = await self.storage.max_id()
        self.transition_id = await last_transition_id(self.storage)
        self.presence_id = await self._max("presence_event")

    async def start(self) -> None:
        """Try once to become the evaluator (a lone instance is, at once); on a database error, `_hold_lock` tries
        again (it must not stop the app starting)."""
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, StorageError):
            self._lock_conn = await asyncpg.connect(self.storage.dsn, timeout=10)
            await self._try_to_evaluate()

    async def _max(self, table: str) -> int:
        ((value,),) = await self.storage.query(f"SELECT coalesce(max(id), 0) FROM {table}", [])
        return int(value)

    # ---- inputs ---------------------------------------------------------------------------------------------

    def committed(self, rows: Sequence[StoredStatus]) -> None:
        """This instance committed `rows` (Presence has them): evaluate them now when they continue the cursor,
        else read from the cursor (another instance's rows may come first)."""
        if not rows:
            return
        first, last = rows[0].id, rows[-1].id
        if not self._behind and first == self.row_id + 1 and last - first == len(rows) - 1:
            self.row_id = last
            self.ops.alerts.on_statuses(rows)
        else:
            self._behind = True
            self._wake.set()

    def follow(self, kind: str) -> None:
        """The RowSource heard another instance (or reconnected): read what it committed."""
        if kind in ("status", "reconnect"):
            self._behind = True
        if kind in ("registry", "reconnect"):
            self._registry_changed = True
        self._wake.set()

    def _registry_saved(self) -> None:
        self._ended_wake.set()
        self._announce_registry = True

    def _connection_ended(self, robot: RobotPresence) -> None:
        self._ended.append((robot.serial_number, robot.since, robot.last_seen))
        self._ended_wake.set()

    # ---- the loops ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Evaluate-or-follow, read, and record connection ends, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._hold_lock(), name="spotbox-alert-evaluator")
            group.create_task(self._read_loop(), name="spotbox-ops-reader")
            group.create_task(self._write_loop(), name="spotbox-ops-writer")

    async def close(self) -> None:
        """Leave the evaluation to another instance (the lock goes with the connection)."""
        self._stop_evaluating()
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:
                conn.terminate()

    async def _hold_lock(self) -> None:
        """Keep a connection; while another instance evaluates, try for its lock now and then."""
        while True:
            try:
                if self._lock_conn is None or self._lock_conn.is_closed():
                    self._lock_conn = await asyncpg.connect(self.storage.dsn, timeout=10)
                if not self.evaluator:
                    await self._try_to_evaluate()
                await asyncio.sleep(self.retry_s)
                async with asyncio.timeout(5):
                    # The lock lives as long as this connection: make sure it still does.
                    await self._lock_conn.execute("SELECT 1")
            except Exception as exc:  # a lost connection, or the driver in a bad state: start again either way
                if self.evaluator:
                    logger.warning("alerts: lost the evaluator's connection, others may take over: %r", exc)
                self._stop_evaluating()
                if self._lock_conn is not None:
                    self._lock_conn.terminate()
                    self._lock_conn = None
                await asyncio.sleep(self.retry_s)

    async def _try_to_evaluate(self) -> None:
        assert self._lock_conn is not None
        # The cursors from which this instance evaluates are where it stands when it takes the lock (the
        # rejections' read with it): statuses and rejections committed while it takes up the stored alerts below
        # are not evaluated as they come (that waits for the alerts), so they are read again from there.
        locked, rejection_id = await self._lock_conn.fetchrow(
            "SELECT pg_try_advisory_lock($1, hashtext(current_schema())), (SELECT coalesce(max(id), 0) FROM rejection)",
            ALERT_EVALUATOR_LOCK,
        )
        if not locked:
            return
        row_id = self.row_id
        # Take up the alerts as stored (the last evaluator's changes are written before its lock is released,
        # or lost with it).
        await self.ops.writer.flushed()
        self.ops.alerts.load(await load_unfinished(self.storage), replace=True)
        self.row_id, self.rejection_id = row_id, rejection_id
        self._behind = True
        self.evaluator = True
        self.ops.alerts.evaluating = True
        self._wake.set()
        logger.info("alerts: this instance evaluates the rules for every instance sharing the database")

    def _stop_evaluating(self) -> None:
        if self.evaluator:
            self.evaluator = False
            self.ops.alerts.evaluating = False

    async def _read_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            except TimeoutError:
                self._behind = True  # a notification lost with a connection that went unnoticed: look anyway
            self._wake.clear()
            try:
                await self.catch_up()
            except StorageError as exc:
                logger.warning("operations: cannot read other instances' changes, retrying: %s", exc)
                await asyncio.sleep(self.retry_s)
                self._wake.set()
            except Exception:
                logger.exception("operations: reading other instances' changes failed; retrying")
                await asyncio.sleep(self.retry_s)
                self._wake.set()

    async def catch_up(self) -> None:
        """Read every change committed since the last read: statuses, alert transitions, connection ends,
        rejections (the evaluator), the registry (when changed)."""
        if self._behind:
            self._behind = False
            await self._read_rows()
        await self._read_transitions()
        await self._read_connection_ends()
        if self.evaluator:
            await self._read_rejections()
        if self._registry_changed:
            self._registry_changed = False
            await self._reload_registry()

    async def _read_rows(self) -> None:
        if not self.evaluator:
            await self._read_last_seen()
            return
        presence, alerts = self.ops.presence, self.ops.alerts
        while True:
            rows = [Reading(*row) for row in await self.storage.query(_READINGS, [self.row_id, _PAGE])]
            # Own rows committed meanwhile may have moved the cursor on: each row once.
            rows = [row for row in rows if row.id > self.row_id]
            if rows:
                for row in rows:
                    presence.seen_elsewhere(row.serial_number, row.received_at)
                alerts.on_records(rows)
                self.row_id = rows[-1].id
            if len(rows) < _PAGE:
                return

    async def _read_last_seen(self) -> None:
        """Presence alone needs each robot's last receive time since the last read: one row per robot."""
        rows = await self.storage.query(_LAST_SEEN, [self.row_id])
        end = self.row_id
        for serial, received_at, last_id in rows:
            self.ops.presence.seen_elsewhere(serial, received_at)
            end = max(end, last_id)
        if self.evaluator:
            # This instance became the evaluator meanwhile: the rows after its cursor are to be evaluated.
            self._behind = True
            self._wake.set()
            return
        # Rows of this instance committed meanwhile may have moved the cursor on.
        self.row_id = max(self.row_id, end)

    async def _read_transitions(self) -> None:
        while True:
            changes = await transitions_after(self.storage, self.transition_id, self.storage.writer_tag)
            for change in changes:
                alert = self.ops.alerts.follow(change.alert, change.transition)
                self.ops.alert_followed(alert)
                self.transition_id = change.id
            if len(changes) < 1000:
                return

    async def _read_connection_ends(self) -> None:
        sql = (
            "SELECT id, serial_number, at, last_seen FROM presence_event WHERE id > $1 AND writer <> $2 "
            "ORDER BY id LIMIT 1000"
        )
        while True:
            rows = await self.storage.query(sql, [self.presence_id, self.storage.writer_tag])
            for row_id, serial, at, last_seen in rows:
                self.ops.presence.ended_elsewhere(serial, at, last_seen)
                self.presence_id = row_id
            if len(rows) < 1000:
                return

    async def _read_rejections(self) -> None:
        sql = "SELECT id, serial_number, received_at FROM rejection WHERE id > $1 ORDER BY id LIMIT 1000"
        while True:
            rows = await self.storage.query(sql, [self.rejection_id])
            for row_id, serial, received_at in rows:
                if is_valid_serial(serial):
                    self.ops.alerts.on_rejection(serial, received_at)
                self.rejection_id = row_id
            if len(rows) < 1000:
                return

    async def _reload_registry(self) -> None:
        stored = await load_registry(self.storage)
        ops = self.ops
        for serial in ops.registry.keys() - stored.keys():
            ops.deregistered(serial, here=False)
        for serial, robot in stored.items():
            if ops.registry.get(serial) != robot:
                ops.registered(robot, here=False)

    async def _write_loop(self) -> None:
        """Record this instance's connection ends, and announce registry changes, for the others."""
        while True:
            await self._ended_wake.wait()
            self._ended_wake.clear()
            ended, self._ended = self._ended, []
            statements: list[tuple[str, Sequence[Any]]] = [
                ("INSERT INTO presence_event (serial_number, at, last_seen, writer) VALUES ($1, $2, $3, $4)",
                 [serial, at, last_seen, self.storage.writer_tag])
                for serial, at, last_seen in ended
            ]  # fmt: skip
            kind = "registry" if self._announce_registry else "presence"
            self._announce_registry = False
            if statements:
                # Only the newest are of use (an instance starting reads from the end): keep the table small.
                statements.append(("DELETE FROM presence_event WHERE id < (SELECT max(id) FROM presence_event) - $1",
                                   [_CONNECTION_ENDS_KEPT]))  # fmt: skip
            try:
                await self.storage.execute(ops_first(self.storage, kind) + statements)
            except Exception as exc:
                # Lost: the other instances see the robot stale, then offline, after its silence.
                logger.warning("%d connection ends not shared with other instances: %r", len(ended), exc)
