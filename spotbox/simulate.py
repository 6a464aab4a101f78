"""The mock robot fleet: robots that move, drain and charge plausibly, publishing their status over MQTT."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import orjson

logger = logging.getLogger(__name__)

MQTT_VERSIONS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


@dataclass(frozen=True)
class FleetConfig:
    """What `spotbox simulate` was asked to do."""

    robot_count: int = 2
    publish_interval_s: float = 1.0
    invalid_rate: float = 0.0
    jitter_max_s: float = 0.2
    enable_stats_log: bool = False
    stats_log_interval_s: float = 5.0
    mqtt_version: str = "5"
    count: int | None = None
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    qos: int = 1
    seed: int | None = None


@dataclass
class FleetStats:
    """What the fleet has published so far."""

    sent: int = 0
    valid: int = 0
    invalid: int = 0
    failed: int = 0
    refused: int = 0  # acknowledged with an MQTT 5 failure reason code (0x99 invalid, 0x87 not authorized)
    rejections_seen: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass
class Robot:
    """One robot's state. A battery falls while MOVING, rises while CHARGING; a drive id lasts a whole drive."""

    serial: str
    rng: random.Random
    battery: float = 80.0
    charging: bool = False
    moving: bool = False
    drive_id: str | None = None
    latitude: float = 52.52
    longitude: float = 13.405
    height: float = 34.0

    def step(self, dt: float) -> None:
        """Advance the robot by `dt` seconds."""
        if self.charging:
            self.battery = min(100.0, self.battery + 0.8 * dt)
            if self.battery >= 95 and self.rng.random() < 0.3:
                self.charging = False
        elif self.moving:
            self.battery = max(1.0, self.battery - 0.5 * dt)
            self.latitude += self.rng.uniform(-1, 1) * 1e-5 * dt
            self.longitude += self.rng.uniform(-1, 1) * 1e-5 * dt
            if self.battery < 20 or self.rng.random() < 0.05:
                self.moving, self.drive_id = False, None
        elif self.battery < 25:
            self.charging = True
        elif self.rng.random() < 0.3:
            self.moving, self.drive_id = True, str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def status(self) -> dict[str, Any]:
        """The status message a robot publishes now."""
        return {
            "battery_level": max(1, min(100, round(self.battery))),
            "battery_status": "CHARGING" if self.charging else "DISCHARGING",
            "driving_status": "MOVING" if self.moving else "IDLE",
            "current_drive_id": self.drive_id,
            "location": {"latitude": self.latitude, "longitude": self.longitude, "height": self.height},
            "timestamp": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        }


def spoil(status: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A deliberately invalid copy of `status`, breaking one rule of the schema."""
    bad = dict(status)
    kind = rng.choice(["battery_high", "battery_low", "battery_status", "moving_no_drive", "no_location", "time"])
    if kind == "battery_high":
        bad["battery_level"] = 150
    elif kind == "battery_low":
        bad["battery_level"] = 0
    elif kind == "battery_status":
        bad["battery_status"] = "FULL"
    elif kind == "moving_no_drive":
        bad["driving_status"], bad["current_drive_id"] = "MOVING", None
    elif kind == "no_location":
        del bad["location"]
    else:
        bad["timestamp"] = "yesterday"
    return bad


class Fleet:
    """N robots, one MQTT connection each, publishing until told to stop or `count` messages are sent."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.stats = FleetStats()
        self._rng = random.Random(config.seed)  # noqa: S311 - a simulation, not security
        self._done = asyncio.Event()
        # The signal that stopped the fleet early (Ctrl-C, SIGTERM), or None.
        self.stopped_by: int | None = None

    def stop(self, signum: int) -> None:
        """Stop publishing: each robot finishes the status in flight, then the fleet returns its stats."""
        self.stopped_by = signum
        self._done.set()

    def _client(self, identifier: str) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self.config.host,
            self.config.port,
            identifier=identifier,
            protocol=MQTT_VERSIONS[self.config.mqtt_version],
            username=self.config.username,
            password=self.config.password,
        )
        self._hear_refusals(client, identifier)
        return client

    def _hear_refusals(self, client: aiomqtt.Client, identifier: str) -> None:
        """Log each MQTT 5 PUBACK/PUBREC with a failure reason code (0x99 and the failing field, for instance).

        aiomqtt completes `publish` without looking at the reason code; its paho client's `on_publish` callback
        (run on this event loop) has it, so it is wrapped here.
        """
        # aiomqtt exposes no hook for acknowledgement reason codes: its paho client is the way in.
        paho_client: Any = client._client
        on_publish = paho_client.on_publish

        def refused_or_not(paho: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
            if getattr(reason_code, "is_failure", False):
                self.stats.refused += 1
                reason = getattr(properties, "ReasonString", "")
                logger.warning("%s publish refused by spotbox: %s %s", identifier, reason_code, reason)
            on_publish(paho, userdata, mid, reason_code, properties)

        paho_client.on_publish = refused_or_not

    def _take_ticket(self) -> bool:
        """Claim the right to publish one more message under `--count`; the last claim wakes every robot."""
        if self.stopped_by is not None or (self.config.count is not None and self.stats.sent >= self.config.count):
            return False
        self.stats.sent += 1
        if self.stats.sent == self.config.count:
            self._done.set()
        return True

    async def run(self) -> FleetStats:
        """Run the fleet to completion."""
        async with asyncio.TaskGroup() as group:
            robots = [
                group.create_task(self._robot(f"ROBOT-{n:03d}"), name=f"robot-{n}")
                for n in range(1, self.config.robot_count + 1)
            ]
            watchers = [group.create_task(self._watch_rejections(), name="rejections")]
            if self.config.enable_stats_log:
                watchers.append(group.create_task(self._log_stats(), name="stats"))
            await asyncio.gather(*robots)
            self._log_summary()
            for task in watchers:
                task.cancel()
        return self.stats

    async def _robot(self, serial: str) -> None:
        robot = Robot(serial, random.Random(self._rng.getrandbits(64)), battery=self._rng.uniform(30, 100))  # noqa: S311
        topic = f"robot/{serial}/status"
        async with self._client(f"spotbox-sim-{serial}") as client:
            last = time.monotonic()
            while self._take_ticket():
                now = time.monotonic()
                robot.step(now - last)
                last = now
                status = robot.status()
                invalid = robot.rng.random() < self.config.invalid_rate
                payload = orjson.dumps(spoil(status, robot.rng) if invalid else status)
                try:
                    await client.publish(topic, payload, qos=self.config.qos)
                except aiomqtt.MqttError as exc:
                    self.stats.failed += 1
                    logger.warning("%s publish failed: %s", serial, exc)
                else:
                    if invalid:
                        self.stats.invalid += 1
                    else:
                        self.stats.valid += 1
                jitter = robot.rng.uniform(0, self.config.jitter_max_s)
                try:
                    async with asyncio.timeout(self.config.publish_interval_s + jitter):
                        await self._done.wait()
                except TimeoutError:
                    pass

    async def _watch_rejections(self) -> None:
        """Log what spotbox says about rejected statuses (a watcher that fails only logs: robots go on)."""
        try:
            async with self._client(f"spotbox-sim-watch-{uuid.uuid4().hex[:8]}") as client:
                await client.subscribe("spotbox/rejected/+", qos=0)
                async for message in client.messages:
                    self.stats.rejections_seen += 1
                    report = orjson.loads(bytes(message.payload)) if isinstance(message.payload, bytes) else {}
                    logger.info("rejected by spotbox on %s: %s", message.topic, "; ".join(report.get("errors", [])))
        except (aiomqtt.MqttError, orjson.JSONDecodeError) as exc:
            logger.warning("cannot watch spotbox/rejected/+: %s", exc)

    async def _log_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_log_interval_s)
            self._log_summary()

    def _log_summary(self) -> None:
        elapsed = max(time.monotonic() - self.stats.started, 1e-9)
        logger.info(
            "sent=%d valid=%d invalid=%d refused=%d failed=%d rate=%.1f/s",
            self.stats.sent,
            self.stats.valid,
            self.stats.invalid,
            self.stats.refused,
            self.stats.failed,
            (self.stats.valid + self.stats.invalid) / elapsed,
        )
