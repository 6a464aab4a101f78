"""`spotbox simulate`: the mock fleet fills spotbox with plausible statuses, some deliberately invalid."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from spotbox.settings import BUNDLED_SCHEMA
from spotbox.simulate import Fleet, FleetConfig, Robot, spoil
from spotbox.status import StatusRecord
from spotbox.validation import Rejection, StatusValidator
from tests.conftest import SPOTBOX, Box
from tests.helpers import open_feed
from tests.mosquitto import mosquitto_process

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

VALIDATOR = StatusValidator(BUNDLED_SCHEMA)


def test_robot_drains_moving_charges_and_keeps_its_drive_id() -> None:
    """Test the fleet's physics: battery falls while MOVING, rises while CHARGING, one drive id per drive."""
    robot = Robot("R1", random.Random(7), battery=60, moving=True, drive_id="5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10")
    levels, drive_ids = [], set()
    while robot.moving:
        levels.append(robot.battery)
        drive_ids.add(robot.drive_id)
        robot.step(1.0)
    assert len(levels) > 1
    assert levels == sorted(levels, reverse=True)
    assert drive_ids == {"5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"}
    assert robot.drive_id is None
    charger = Robot("R2", random.Random(3), battery=30, charging=True)
    before = charger.battery
    charger.step(5.0)
    assert charger.battery > before


def test_generated_statuses_are_valid_and_spoiled_ones_are_not() -> None:
    """Test that every status a robot produces passes the schema, and every spoiled copy fails it."""
    rng = random.Random(11)
    robot = Robot("R1", rng)
    for _ in range(300):
        robot.step(rng.uniform(0.1, 3))
        status = robot.status()
        good = VALIDATOR.check("R1", orjson.dumps(status), datetime.now(UTC))
        assert isinstance(good, StatusRecord), (status, good)
        bad = VALIDATOR.check("R1", orjson.dumps(spoil(status, rng)), datetime.now(UTC))
        assert isinstance(bad, Rejection)


async def test_fleet_stores_exactly_its_valid_statuses(box: Box) -> None:
    """Test that 20 statuses with 30% invalid leave exactly the valid ones in the history, in time order."""
    config = FleetConfig(
        robot_count=2,
        publish_interval_s=0.0,
        jitter_max_s=0.0,
        invalid_rate=0.3,
        count=20,
        port=box.mqtt_port,
        seed=5,
    )
    stats = await Fleet(config).run()
    assert stats.valid + stats.invalid == 20
    assert stats.invalid > 0
    assert stats.failed == 0
    # MQTT 5 by default: each invalid status came back as a PUBACK with a failure reason code.
    assert stats.refused == stats.invalid
    stored = (await box.history("ROBOT-001")) + (await box.history("ROBOT-002"))
    assert len(stored) == stats.valid
    assert box.pipeline.stats.rejected.total() == stats.invalid
    for serial in ("ROBOT-001", "ROBOT-002"):
        times = [item["ts"] for item in await box.history(serial)]
        assert times == sorted(times)


async def simulate(port: int, count: int, invalid_rate: float, robots: int) -> tuple[bytes, bytes]:
    """Run `spotbox simulate` as a user does (robots from ROBOT_COUNT) to the end; its stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *(SPOTBOX, "simulate", "--count", str(count), "--invalid-rate", str(invalid_rate), "--port", str(port)),
        env={**os.environ, "ROBOT_COUNT": str(robots), "PUBLISH_INTERVAL_SEC": "0.01", "JITTER_MAX_SEC": "0"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out, err


async def test_simulate_command_with_fleet_env_vars(box: Box) -> None:
    """Test `spotbox simulate --count 20 --invalid-rate 0.3` as a user runs it, robots from ROBOT_COUNT."""
    out, err = await simulate(box.mqtt_port, 20, 0.3, robots=3)
    assert b"sent 20 statuses" in out
    assert b"was refused" not in err
    rejected = box.pipeline.stats.rejected.total()
    # The robots (MQTT 5 by default) log each 0x99 PUBACK with the failing field.
    assert err.decode().count("publish refused by spotbox: Payload format invalid") == rejected
    valid = 20 - rejected
    per_robot = [len(await box.history(f"ROBOT-00{n}")) for n in (1, 2, 3)]
    assert all(count > 0 for count in per_robot)
    assert sum(per_robot) == valid


@pytest.mark.parametrize(("count", "code"), [([], 0), (["--count", "1000000"], 128 + signal.SIGINT)])
async def test_ctrl_c_prints_the_summary(box: Box, count: list[str], code: int) -> None:
    """Test that Ctrl-C stops spotbox simulate with its summary and no traceback: exit 0 for an open-ended run,
    128+SIGINT when it stops short of --count."""
    async with open_feed(box.http, f"{box.base_url}/feed") as feed:
        proc = await asyncio.create_subprocess_exec(
            SPOTBOX,
            "simulate",
            *count,
            "--port",
            str(box.mqtt_port),
            "--publish-interval-sec",
            "0.01",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            for _ in range(5):
                await feed.next()
            proc.send_signal(signal.SIGINT)
            out, err = await proc.communicate()
    assert proc.returncode == code, err.decode()
    assert b"Traceback" not in err
    assert b"Aborted" not in err
    match = re.fullmatch(rb"sent (\d+) statuses \(0 invalid, 0 failed\)\n", out)
    assert match is not None, out
    # Every status it counts as sent was acknowledged, so stored.
    assert int(match.group(1)) == box.pipeline.stats.stored


async def test_simulate_against_another_broker_warns(tmp_path: Path) -> None:
    """Test that invalid statuses all acknowledged without a refusal (a plain broker on the port given, as when
    Mosquitto holds 1883 and spotbox runs elsewhere) end with a warning naming the port, not silence."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        out, err = await simulate(broker.port, 4, 1, robots=2)
    assert b"sent 4 statuses (4 invalid, 0 failed)" in out
    assert f"warning: none of the 4 invalid statuses was refused: 127.0.0.1:{broker.port} is not".encode() in err
