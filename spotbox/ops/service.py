"""The operations service: presence, the registry, alerts, the rejection record and their outputs, on one app.

Inputs come from the ingest pipeline (`on_stored`, `on_rejected`), the broker (through `presence`) and a clock tick.
Outputs go to the feeds (`presence` and `alert` events), MQTT (`spotbox/alerts/{serial}`, retained), the database
and the webhook; none of them is waited on by ingest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from spotbox.ops.alerts import Alert, AlertEngine, Transition
from spotbox.ops.presence import Presence, RobotPresence, State, utc_now
from spotbox.ops.rules import load_rules
from spotbox.ops.store import (
    REJECTED_PAYLOAD_KEPT,
    AlertWriter,
    RegisteredRobot,
    RejectionLog,
    RejectionRecord,
    load_registry,
    load_unfinished,
)
from spotbox.ops.webhook import Webhook
from spotbox.settings import Settings
from spotbox.sse import FeedHub
from spotbox.status import StoredStatus, dumps_kept, is_valid_serial
from spotbox.storage import Storage
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)

ALERTS_TOPIC = "spotbox/alerts/{serial}"
# Robots whose retained alerts topic is published between two turns of the event loop.
PUBLISH_TURN = 100
# Publishes a retained MQTT message (topic, payload): the broker's one entry point for spotbox's own messages.
RetainedPublisher = Callable[[str, bytes], Awaitable[None]]


class Operations:
    """Everything an operator of the fleet watches, kept current as statuses and time go by."""

    def __init__(
        self, storage: Storage, settings: Settings, hub: FeedHub, *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.storage = storage
        self.settings = settings
        self.hub = hub
        self.clock = clock
        self.registry: dict[str, RegisteredRobot] = {}
        self.presence = Presence(
            stale_after_s=settings.stale_after_s, offline_after_s=settings.offline_after_s, clock=clock
        )
        self.alerts = AlertEngine(load_rules(settings.alerts_path), clock=clock, registered=self.is_registered)
        self.writer = AlertWriter(storage, on_written=self._alert_written)
        # Told of each alert change once it is stored (the webhook, upstream forwarders): the outside world hears of
        # a change only from the instance whose change the database kept.
        self.written_listeners: list[Callable[[Alert, Transition, dict[str, Any]], None]] = []
        self.rejections = RejectionLog(storage, per_robot=settings.rejections_kept)
        self.webhook = Webhook(settings.alert_webhook) if settings.alert_webhook else None
        self.publish_retained: RetainedPublisher | None = None
        self._dirty: set[str] = set()
        self._dirty_wake = asyncio.Event()
        self.presence.listeners.extend([self._presence_changed, self.alerts.on_presence])
        self.alerts.listeners.append(self._alert_changed)
        # Where committed statuses and rejections go to be judged, and who hears of a registry change: the engine
        # and nobody on one instance; instances sharing PostgreSQL replace them (spotbox/cluster/ops.py).
        self.evaluate_statuses: Callable[[Sequence[StoredStatus]], None] = self.alerts.on_statuses
        self.evaluate_rejection: Callable[[str, datetime], None] = self.alerts.on_rejection
        self.registry_saved: Callable[[], None] = lambda: None

    def is_registered(self, serial: str) -> bool:
        """True when an operator registered the robot."""
        return serial in self.registry

    async def start(self) -> None:
        """Read back the registry and the unfinished alerts; every known robot's presence is unknown for now."""
        self.registry = await load_registry(self.storage)
        unfinished = await load_unfinished(self.storage)
        self.alerts.load(unfinished)
        latest = await self.storage.latest_per_robot()
        self.presence.seed((row.serial_number, row.received_at) for row in latest)
        self.presence.seed((serial, None) for serial in self.registry)
        logger.info(
            "operations ready: %d registered robots, %d robots seen, %d unfinished alerts",
            len(self.registry), len(latest), len(unfinished),
        )  # fmt: skip

    # ---- inputs ---------------------------------------------------------------------------------------------

    def on_stored(self, rows: Sequence[StoredStatus]) -> None:
        """Committed statuses: presence first (a status makes its robot online), then the value rules."""
        for row in rows:
            self.presence.status_committed(row.record.serial_number, row.record.received_at)
        self.evaluate_statuses(rows)

    def on_rejected(self, rejection: Rejection, received_at: datetime, raw: bytes) -> None:
        """A refused status: kept in the rejection record and counted by the rejection rules."""
        # A topic may carry any serial; the record keeps a bounded one.
        serial = rejection.serial_number[:128]
        record = RejectionRecord(serial, received_at, rejection.field, rejection.reason, raw[:REJECTED_PAYLOAD_KEPT])
        self.rejections.add(record)
        # A topic can name anything: only robots' serials get a rejection window (a flood of made-up names
        # must not grow the engine's memory).
        if is_valid_serial(serial):
            self.evaluate_rejection(serial, received_at)

    def registered(self, robot: RegisteredRobot, *, here: bool = True) -> None:
        """An operator registered or changed a robot (`here`: on this instance, else on another one)."""
        self.registry[robot.serial_number] = robot
        self.presence.seed([(robot.serial_number, None)])
        self.alerts.on_registered(robot.serial_number)
        if here:
            self.registry_saved()

    def deregistered(self, serial: str, *, here: bool = True) -> None:
        """An operator removed a robot from the registry (`here`: on this instance, else on another one)."""
        self.registry.pop(serial, None)
        robot = self.presence.robots.get(serial)
        if robot is not None and robot.last_seen is None:
            self.presence.forget(serial)
        self.alerts.on_registered(serial)
        if here:
            self.registry_saved()

    # ---- outputs --------------------------------------------------------------------------------------------

    def _presence_changed(self, robot: RobotPresence, before: State) -> None:
        data = {"serial_number": robot.serial_number, "previous": before, **robot.to_api()}
        self.hub.publish_event(None, "presence", data)

    def _alert_changed(self, alert: Alert, transition: Transition) -> None:
        document = alert.to_api()
        self.writer.add(alert, transition, document)
        self.alert_followed(alert, document)

    def alert_followed(self, alert: Alert, document: dict[str, Any] | None = None) -> None:
        """An alert changed, here or on another instance: to this instance's feeds and MQTT broker."""
        self.hub.publish_event(alert.serial_number, "alert", document or alert.to_api())
        self._dirty.add(alert.serial_number)
        self._dirty_wake.set()

    def _alert_written(self, alert: Alert, transition: Transition, document: Any, kept: bool) -> None:
        if not kept:
            self._alert_gone(alert)
            return
        if self.webhook is not None:
            self.webhook.send({"transition": transition.to_api(), "alert": document})
        for listener in self.written_listeners:
            listener(alert, transition, document)

    def _alert_gone(self, alert: Alert) -> None:
        """The database did not keep the alert (another instance had one of its rule and robot first): it was on the
        feeds and in the robot's retained message already, so say it is gone, as a clearing that closes it is told
        (not open), and republish the robot's open alerts."""
        self.alerts.discard(alert)
        at = max(self.clock(), alert.updated_at)
        gone = alert.to_api() | {"state": "cleared", "cleared_at": at, "updated_at": at, "open": False}
        self.hub.publish_event(alert.serial_number, "alert", gone)
        self._dirty.add(alert.serial_number)
        self._dirty_wake.set()

    async def _publish_alerts(self) -> None:
        """Keep `spotbox/alerts/{serial}` (retained) equal to each changed robot's open alerts."""
        while True:
            await self._dirty_wake.wait()
            self._dirty_wake.clear()
            if self.publish_retained is None:
                continue
            dirty, self._dirty = self._dirty, set()
            for n, serial in enumerate(sorted(dirty)):
                if n and n % PUBLISH_TURN == 0:
                    await asyncio.sleep(0)  # a burst of changed robots takes turns with the connections
                alerts = [alert.to_api() for alert in self.alerts.open_alerts(serial)]
                try:
                    await self.publish_retained(ALERTS_TOPIC.format(serial=serial), dumps_kept(alerts))
                except Exception:
                    logger.exception("alerts of %s not published over MQTT", serial)

    def broker_ready(self, publish_retained: RetainedPublisher) -> None:
        """The broker is up: publish what changed so far, and every change from now on."""
        self.publish_retained = publish_retained
        self._dirty_wake.set()

    async def _tick(self) -> None:
        """The clock: time rules of presence and alerts, and the rejection record's retention."""
        interval = self.settings.ops_tick_s
        retention_every = max(1, int(self.settings.retention_interval_s / interval))
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            try:
                self.presence.tick()
                self.alerts.tick()
                ticks += 1
                if self.settings.retention_days is not None and ticks % retention_every == 0:
                    cutoff = self.clock() - timedelta(days=self.settings.retention_days)
                    await self.rejections.delete_before(cutoff)
            except Exception:
                logger.exception("operations tick failed; next in %.1f s", interval)

    async def run(self) -> None:
        """The background loops, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._tick(), name="spotbox-ops-tick")
            group.create_task(self.writer.run(), name="spotbox-alert-writer")
            group.create_task(self.rejections.run(), name="spotbox-rejection-writer")
            group.create_task(self._publish_alerts(), name="spotbox-alert-mqtt")
            if self.webhook is not None:
                group.create_task(self.webhook.run(), name="spotbox-alert-webhook")

    def summary(self, serial: str) -> dict[str, Any]:
        """Presence and registry fields of one robot, as GET /robots shows them."""
        robot = self.presence.robots.get(serial)
        registered = self.registry.get(serial)
        return {
            "presence": robot.state if robot else "unknown",
            "presence_since": robot.since if robot else None,
            "registered": registered is not None,
            **(registered.to_api() if registered else {"name": None, "model": None, "site": None, "tags": []}),
        }
