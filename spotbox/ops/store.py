"""The operations tables: the registered fleet, alerts and their transitions, and the bounded rejection record.

The SQL is shared by both backends (`$n` placeholders; SQLite reads them as `?n`); times go through the backend's
`db_time`. Alert changes and rejections are written by one background task each, off the ingest path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from spotbox.errors import StorageConflictError, StorageError
from spotbox.ops.alerts import ALERT_STATES, Alert, Transition
from spotbox.storage import Storage

logger = logging.getLogger(__name__)

# The first 4 KiB of a rejected payload are kept: enough to see what was wrong, bounded whatever was sent.
REJECTED_PAYLOAD_KEPT = 4096
_RETRY_FIRST_S = 0.1
# Most alert changes written in one transaction. SQLite has one writer, so a burst of 10,000 changes (every robot
# of a fleet crossing a threshold in the same second) written whole held the status batches behind it for about
# a second; in transactions of this size, status commits take turns with it.
WRITE_BATCH_MAX = 250
_RETRY_MAX_S = 5.0


# ---- the registry ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RegisteredRobot:
    """A robot an operator registered: its name, model, site and tags."""

    serial_number: str
    name: str | None
    model: str | None
    site: str | None
    tags: tuple[str, ...]
    registered_at: datetime
    updated_at: datetime

    def to_api(self) -> dict[str, Any]:
        """The registry's fields as the API shows them."""
        return {
            "name": self.name,
            "model": self.model,
            "site": self.site,
            "tags": list(self.tags),
            "registered_at": self.registered_at,
        }


_ROBOT_COLUMNS = "serial_number, name, model, site, tags, registered_at, updated_at"


async def load_registry(storage: Storage) -> dict[str, RegisteredRobot]:
    """Every registered robot, by serial number."""
    rows = await storage.query(f"SELECT {_ROBOT_COLUMNS} FROM robot", [])
    robots = (
        RegisteredRobot(
            row[0], row[1], row[2], row[3], tuple(orjson.loads(row[4])),
            storage.from_db_time(row[5]), storage.from_db_time(row[6]),
        )
        for row in rows
    )  # fmt: skip
    return {robot.serial_number: robot for robot in robots}


async def save_robot(storage: Storage, robot: RegisteredRobot) -> None:
    """Insert or replace one registered robot."""
    sql = (
        f"INSERT INTO robot ({_ROBOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (serial_number) "
        "DO UPDATE SET name = $2, model = $3, site = $4, tags = $5, updated_at = $7"
    )
    params = [
        robot.serial_number, robot.name, robot.model, robot.site, orjson.dumps(list(robot.tags)).decode(),
        storage.db_time(robot.registered_at), storage.db_time(robot.updated_at),
    ]  # fmt: skip
    await storage.execute([(sql, params)])


async def delete_robot(storage: Storage, serial: str) -> bool:
    """Remove a robot from the registry (its statuses stay); False when it was not registered."""
    (count,) = await storage.execute([("DELETE FROM robot WHERE serial_number = $1", [serial])])
    return count > 0


# ---- alerts ----------------------------------------------------------------------------------------------------

_ALERT_COLUMNS = (
    "id, rule, serial_number, severity, state, acknowledged, ack_by, ack_at, created_at, activated_at, cleared_at, "
    "updated_at, value, message"
)
# An alert's first change (None -> pending) inserts its row; when another instance opened an alert of the same rule
# and robot first, the one-in-progress index (alert_one_current) leaves this one out and the writer says so.
_INSERT_ALERT = (
    f"INSERT INTO alert ({_ALERT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
    "ON CONFLICT DO NOTHING"
)
# Later changes of its state update it (only the evaluating instance makes them). An acknowledgement made by another
# instance is never taken back.
_UPDATE_ALERT = (
    "UPDATE alert SET state = $2, acknowledged = (acknowledged OR $3), ack_by = coalesce(ack_by, $4), "
    "ack_at = coalesce(ack_at, $5), activated_at = $6, cleared_at = $7, updated_at = $8, value = $9 WHERE id = $1"
)
# An acknowledgement (stored first by `acknowledge_once`) sets the acknowledgement alone: the instance making it may
# hold an out-of-date copy of the alert (the evaluator's last changes not yet read), and its state is the
# evaluator's to write.
_ACKNOWLEDGE_ALERT = (
    "UPDATE alert SET acknowledged = $2, ack_by = coalesce(ack_by, $3), ack_at = coalesce(ack_at, $4) WHERE id = $1"
)
# A transition is kept only with its alert's row.
_INSERT_TRANSITION = (
    "INSERT INTO alert_transition (alert_id, at, from_state, to_state, by_user, writer) "
    "SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM alert WHERE id = $1)"
)
# Acknowledging is decided by the database: of two users (on two instances) acknowledging at once, one does.
_ACKNOWLEDGE = (
    "UPDATE alert SET acknowledged = $2, ack_by = $3, ack_at = $4, updated_at = $4 WHERE id = $1 AND acknowledged = $5"
)
_TRANSITION_COLUMNS = "t.id, t.alert_id, t.at, t.from_state, t.to_state, t.by_user"


def _time_or_none(storage: Storage, value: datetime | None) -> Any:
    return None if value is None else storage.db_time(value)


def _alert(storage: Storage, row: Sequence[Any]) -> Alert:
    def t(value: Any) -> datetime | None:
        return None if value is None else storage.from_db_time(value)

    created, updated = storage.from_db_time(row[8]), storage.from_db_time(row[11])
    return Alert(
        id=row[0], rule=row[1], serial_number=row[2], severity=row[3], state=row[4], acknowledged=bool(row[5]),
        ack_by=row[6], ack_at=t(row[7]), created_at=created, activated_at=t(row[9]), cleared_at=t(row[10]),
        updated_at=updated, value=row[12], message=row[13],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AlertQuery:
    """A page of alerts, newest first: by state (`open` for the console's list), robot, and creation time."""

    state: str | None = None
    serial_number: str | None = None
    since: datetime | None = None
    before: tuple[datetime, str] | None = None
    limit: int = 100


async def query_alerts(storage: Storage, query: AlertQuery) -> list[Alert]:
    """Alerts matching `query`, newest first (by created_at, id), with their transitions."""
    clauses: list[str] = []
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if query.state == "open":
        clauses.append("(state <> 'cleared' OR (acknowledged = " + param(False) + " AND activated_at IS NOT NULL))")
    elif query.state is not None:
        clauses.append(f"state = {param(query.state)}")
    if query.serial_number is not None:
        clauses.append(f"serial_number = {param(query.serial_number)}")
    if query.since is not None:
        clauses.append(f"created_at >= {param(storage.db_time(query.since))}")
    if query.before is not None:
        moment, alert_id = query.before
        clauses.append(f"(created_at, id) < ({param(storage.db_time(moment))}, {param(alert_id)})")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_ALERT_COLUMNS} FROM alert {where} ORDER BY created_at DESC, id DESC LIMIT {param(query.limit)}"
    alerts = [_alert(storage, row) for row in await storage.query(sql, params)]
    await _attach_history(storage, alerts)
    return alerts


async def get_alert(storage: Storage, alert_id: str) -> Alert | None:
    """One alert with its transitions, or None."""
    rows = await storage.query(f"SELECT {_ALERT_COLUMNS} FROM alert WHERE id = $1", [alert_id])
    if not rows:
        return None
    alert = _alert(storage, rows[0])
    await _attach_history(storage, [alert])
    return alert


async def load_unfinished(storage: Storage) -> list[Alert]:
    """The alerts a restart takes up: pending, active, or cleared and not acknowledged."""
    return await query_alerts(storage, AlertQuery(state="open", limit=100_000))


async def acknowledge_once(storage: Storage, alert_id: str, by: str | None, at: datetime) -> bool:
    """Mark the stored alert acknowledged unless it already is; True when this call did it."""
    (count,) = await storage.execute([(_ACKNOWLEDGE, [alert_id, True, by, storage.db_time(at), False])])
    return count > 0


@dataclass(frozen=True, slots=True)
class StoredTransition:
    """A transition as stored, with its row id and its alert (as the alert's row is now)."""

    id: int
    alert: Alert
    transition: Transition


async def transitions_after(
    storage: Storage, after_id: int, not_by: str | None, limit: int = 1000
) -> list[StoredTransition]:
    """Transitions with an id above `after_id` written by another writer than `not_by`, in id order, each with its
    alert's stored row."""
    sql = (
        f"SELECT {_TRANSITION_COLUMNS}, {', '.join('a.' + c for c in _ALERT_COLUMNS.split(', '))} "
        "FROM alert_transition t JOIN alert a ON a.id = t.alert_id "
        "WHERE t.id > $1 AND t.writer IS DISTINCT FROM $2 ORDER BY t.id LIMIT $3"
    )
    rows = await storage.query(sql, [after_id, not_by, limit])
    return [
        StoredTransition(row[0], _alert(storage, row[6:]), Transition(storage.from_db_time(row[2]), *row[3:6]))
        for row in rows
    ]


async def last_transition_id(storage: Storage) -> int:
    """The greatest transition id (0 when there is none)."""
    ((value,),) = await storage.query("SELECT coalesce(max(id), 0) FROM alert_transition", [])
    return int(value)


async def _attach_history(storage: Storage, alerts: list[Alert]) -> None:
    if not alerts:
        return
    by_id = {alert.id: alert for alert in alerts}
    ids = list(by_id)
    # Both backends bound the parameters of a statement (about 32k): ask in chunks.
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        marks = ", ".join(f"${n + 1}" for n in range(len(chunk)))
        sql = (
            "SELECT alert_id, at, from_state, to_state, by_user FROM alert_transition "
            f"WHERE alert_id IN ({marks}) ORDER BY id"
        )
        for row in await storage.query(sql, chunk):
            by_id[row[0]].history.append(Transition(storage.from_db_time(row[1]), row[2], row[3], row[4]))


# Called for each change once it is stored, with the alert's document as it was at the change, and False when its
# alert's row was left out (another instance opened an alert of the same rule and robot first).
Written = Callable[[Alert, Transition, Any, bool], None]
# Statements a backend runs first in each transaction of operations changes (PostgreSQL: commit order, a wake-up).
Statements = list[tuple[str, Sequence[Any]]]


class AlertWriter:
    """Writes each alert change (the alert's row and its transition) in the background, in order, retrying while
    storage is away: the engine never waits on the database. `on_written` hears of each change once committed,
    which is when it may be told to the world outside (the webhook)."""

    def __init__(
        self,
        storage: Storage,
        max_pending: int = 100_000,
        *,
        writer: str | None = None,
        first: Statements | None = None,
        on_written: Written | None = None,
    ) -> None:
        self.storage = storage
        self.writer = writer
        self.first: Statements = first or []
        self.on_written = on_written
        self._pending: deque[tuple[Alert, Transition, Any]] = deque()
        self._max_pending = max_pending
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight: asyncio.Future[list[int]] | None = None

    def add(self, alert: Alert, transition: Transition, document: Any = None) -> None:
        """Queue a change for writing (with what `on_written` is to be given of it); never waits."""
        if len(self._pending) >= self._max_pending:
            dropped, _, _ = self._pending.popleft()
            logger.error(
                "alert writer is %d changes behind; a change of alert %s is lost", self._max_pending, dropped.id
            )
        self._pending.append((alert, transition, document))
        self._idle.clear()
        self._wake.set()

    async def flushed(self, wait_s: float = 2.0) -> None:
        """Wait (at most `wait_s`) until every queued change is written, so a read sees it."""
        try:
            async with asyncio.timeout(wait_s):
                await self._idle.wait()
        except TimeoutError:
            logger.warning("alert changes not yet written after %.1f s; answering from what is stored", wait_s)

    async def run(self) -> None:
        """The writer loop, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.write_pending()

    async def write_pending(self, *, retry: bool = True) -> None:
        """Write every queued change, in order; while storage is away, retry with backoff (or, without `retry`,
        leave them queued)."""
        if self._inflight is not None:
            # A write the cancelled loop started goes first: changes are written in order.
            with contextlib.suppress(Exception):
                await self._inflight
        delay = _RETRY_FIRST_S
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), WRITE_BATCH_MAX))]
            try:
                # Shielded: a shutdown cancelling this loop lets a started write finish instead of tearing a
                # connection mid-transaction.
                self._inflight = asyncio.ensure_future(self.storage.execute(self.first + self._statements(batch)))
                counts = await asyncio.shield(self._inflight)
            except StorageConflictError as exc:
                # Retrying cannot help (two instances at odds for a moment over an alert in progress): the batch
                # goes, the changes after it are written.
                logger.error("%d alert changes dropped, the database refused them: %s", len(batch), exc)
            except StorageError as exc:
                self._pending.extendleft(reversed(batch))
                if not retry:
                    logger.error("%d alert changes not written: %s", len(batch), exc)
                    return
                logger.warning("alert changes not written, retrying in %.1f s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception:
                logger.exception("alert changes could not be written; %d dropped", len(batch))
            else:
                self._written(batch, counts[len(self.first) :])
            delay = _RETRY_FIRST_S
        self._idle.set()

    def _written(self, batch: list[tuple[Alert, Transition, Any]], counts: list[int]) -> None:
        # Two statements per change: the alert's row, then the transition (kept only with that row).
        for (alert, transition, document), kept in zip(batch, counts[1::2], strict=True):
            if not kept:
                logger.warning(
                    "alert %s (%s on %s) not stored: another instance has one of this rule and robot in progress",
                    alert.id, alert.rule, alert.serial_number,
                )  # fmt: skip
            if self.on_written is not None:
                try:
                    self.on_written(alert, transition, document, kept > 0)
                except Exception:
                    logger.exception("alert change listener failed for alert %s", alert.id)

    def _statements(self, batch: list[tuple[Alert, Transition, Any]]) -> list[tuple[str, Sequence[Any]]]:
        db = self.storage
        statements: list[tuple[str, Sequence[Any]]] = []
        for alert, transition, _ in batch:
            ack_at, activated_at = _time_or_none(db, alert.ack_at), _time_or_none(db, alert.activated_at)
            cleared_at, updated_at = _time_or_none(db, alert.cleared_at), db.db_time(alert.updated_at)
            if transition.from_state is None:
                row = [
                    alert.id, alert.rule, alert.serial_number, alert.severity, alert.state, alert.acknowledged,
                    alert.ack_by, ack_at, db.db_time(alert.created_at), activated_at, cleared_at, updated_at,
                    alert.value, alert.message,
                ]  # fmt: skip
                statements.append((_INSERT_ALERT, row))
            elif transition.to_state not in ALERT_STATES:
                statements.append((_ACKNOWLEDGE_ALERT, [alert.id, True, alert.ack_by, ack_at]))
            else:
                row = [
                    alert.id, alert.state, alert.acknowledged, alert.ack_by, ack_at, activated_at, cleared_at,
                    updated_at, alert.value,
                ]  # fmt: skip
                statements.append((_UPDATE_ALERT, row))
            change = [
                alert.id, db.db_time(transition.at), transition.from_state, transition.to_state, transition.by,
                self.writer,
            ]  # fmt: skip
            statements.append((_INSERT_TRANSITION, change))
        return statements


# ---- the rejection record --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RejectionRecord:
    """A refused status as the operator's record keeps it."""

    serial_number: str
    received_at: datetime
    field: str
    reason: str
    payload: bytes

    def to_api(self, row_id: int | None = None) -> dict[str, Any]:
        """The record as GET /rejections shows it (the payload start as text, bad bytes replaced)."""
        return {
            "id": row_id,
            "serial_number": self.serial_number,
            "received_at": self.received_at,
            "field": self.field,
            "reason": self.reason,
            "payload": self.payload.decode("utf-8", errors="replace"),
            "payload_truncated": len(self.payload) >= REJECTED_PAYLOAD_KEPT,
        }


class RejectionLog:
    """Keeps rejections in their own table, written in batches by a background task and bounded three ways: at
    most `per_robot` rows per robot, at most `total` rows in all, and (with retention) none older than it."""

    def __init__(
        self,
        storage: Storage,
        *,
        per_robot: int = 1000,
        total: int = 100_000,
        buffer: int = 10_000,
        interval_s: float = 0.5,
    ) -> None:
        self.storage = storage
        self.per_robot = per_robot
        self.total = total
        self.interval_s = interval_s
        self.dropped = 0
        self._buffer: deque[RejectionRecord] = deque(maxlen=buffer)
        self._buffer_size = buffer
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._inflight: asyncio.Future[list[int]] | None = None
        # Run first in each write (as the alert writer's `first`).
        self.first: Statements = []

    def add(self, record: RejectionRecord) -> None:
        """Queue a rejection; under a flood the oldest unwritten ones give way (counted in `dropped`)."""
        if len(self._buffer) >= self._buffer_size:
            self.dropped += 1
        self._buffer.append(record)
        self._wake.set()

    async def run(self) -> None:
        """Write what is queued every `interval_s`, then trim, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # A bug or a driver error, not an outage: log it and go on (the batch is lost, ingest is not).
                logger.exception("rejections not recorded")
            await asyncio.sleep(self.interval_s)

    async def flush(self) -> None:
        """Write the queued rejections and trim the table to its bounds; returns once what was queued before the
        call is written (a write already under way included), so a read that follows sees it."""
        async with self._flushing:
            if self._inflight is not None:
                # A write a cancelled flush left running (shielded) ends before storage may close.
                with contextlib.suppress(Exception):
                    await self._inflight
                self._inflight = None
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, deque(maxlen=self._buffer_size)
        db = self.storage
        insert = (
            "INSERT INTO rejection (serial_number, received_at, field, reason, payload) VALUES ($1, $2, $3, $4, $5)"
        )
        statements: list[tuple[str, Sequence[Any]]] = [
            *self.first,
            *((insert, [r.serial_number, db.db_time(r.received_at), r.field, r.reason, r.payload]) for r in batch),
        ]
        # Each robot keeps its newest `per_robot` rows, found through the (serial_number, id) index.
        trim = (
            "DELETE FROM rejection WHERE serial_number = $1 AND id <= (SELECT id FROM rejection "
            "WHERE serial_number = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)"
        )
        statements.extend((trim, [serial, self.per_robot]) for serial in {r.serial_number for r in batch})
        statements.append(("DELETE FROM rejection WHERE id <= (SELECT max(id) FROM rejection) - $1", [self.total]))
        try:
            # Shielded as the alert writer's writes are: shutdown lets a started write finish (see flush).
            self._inflight = asyncio.ensure_future(db.execute(statements))
            await asyncio.shield(self._inflight)
        except StorageError as exc:
            logger.warning("%d rejections not recorded yet (retrying): %s", len(batch), exc)
            # Put them back before what came meanwhile, within the bound (the newest are kept).
            batch.extend(self._buffer)
            self._buffer = batch
            self._wake.set()

    async def delete_before(self, cutoff: datetime) -> int:
        """Retention: remove rejections received before `cutoff`."""
        (count,) = await self.storage.execute(
            [("DELETE FROM rejection WHERE received_at < $1", [self.storage.db_time(cutoff)])]
        )
        return count

    async def recent(self, serial: str | None, limit: int) -> list[dict[str, Any]]:
        """The newest rejections (of one robot), newest first."""
        params: list[Any] = [] if serial is None else [serial]
        where = "" if serial is None else "WHERE serial_number = $1"
        params.append(limit)
        sql = (
            f"SELECT id, serial_number, received_at, field, reason, payload FROM rejection {where} "
            f"ORDER BY id DESC LIMIT ${len(params)}"
        )
        rows = await self.storage.query(sql, params)
        return [
            RejectionRecord(row[1], self.storage.from_db_time(row[2]), row[3], row[4], bytes(row[5])).to_api(row[0])
            for row in rows
        ]
