"""`spotbox bench --scenario logins`: how fast robots log in to a `spotbox run --users`, the first time and again.

A first login costs an argon2 check (tens of milliseconds of CPU by design, a bounded pool of them at a time); a
robot that already proved its password is remembered (`spotbox/mqtt/auth.py`) and reconnects without one. The
bench writes a users file with one user per robot, starts `spotbox run --users` on it, logs every robot in at once
(each from its own loopback address, as a fleet's robots come from their own: one address gets only its share of
the login slots), disconnects them, and logs them in again.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from spotbox.bench import BenchError, cpu_seconds, scratch_database, spotbox_server
from spotbox.loadgen import CONNACK, connect_packet
from spotbox.users import FORMAT_VERSION, hash_password

PASSWORD = "bench-password-0123"  # noqa: S105 - the bench's throwaway users


def _user(index: int) -> str:
    return f"LOGIN-{index:05d}"


def _address(index: int) -> str:
    """A loopback address of its own for the index-th robot (Linux answers on all of 127.0.0.0/8)."""
    return f"127.1.{index // 250}.{1 + index % 250}"


async def _login(port: int, index: int) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(_address(index), 0))
    writer.write(connect_packet(_user(index), username=_user(index), password=PASSWORD))
    connack = await reader.readexactly(4)
    if connack[0] != CONNACK or connack[3] != 0:
        writer.close()
        raise BenchError(f"robot {_user(index)} was refused: CONNACK {connack.hex()}")
    return writer


async def _wave(port: int, robots: int, pid: int) -> tuple[float, float]:
    """Every robot logs in at once; seconds until the last CONNACK and the server's CPU seconds meanwhile."""
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    async with asyncio.timeout(600):
        writers = await asyncio.gather(*(_login(port, index) for index in range(robots)))
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu_before
    for writer in writers:
        writer.write(b"\xe0\x00")  # DISCONNECT
        writer.close()
    for writer in writers:
        await writer.wait_closed()
    return seconds, cpu


async def run_logins(robots: int, database_url: str | None = None) -> dict[str, Any]:
    """Log `robots` robots in twice; the rates and the server's CPU a login, as one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="spotbox-bench-") as tmp:
        workdir = Path(tmp)
        # One hash for every user: a check costs the same whatever the salt, and the file is written in a moment.
        hashed = hash_password(PASSWORD)
        users = {_user(index): {"password": hashed, "publish": [], "subscribe": []} for index in range(robots)}
        path = workdir / "users.json"
        path.write_bytes(orjson.dumps({"version": FORMAT_VERSION, "users": users}))
        path.chmod(0o600)
        async with (
            scratch_database(database_url, workdir, "spotbox") as database,
            spotbox_server(database, "--users", str(path)) as server,
        ):
            pid = server.proc.pid
            first_s, first_cpu = await _wave(server.mqtt_port, robots, pid)
            await asyncio.sleep(0.5)  # every session ended before the robots come back
            again_s, again_cpu = await _wave(server.mqtt_port, robots, pid)
    return {
        "scenario": "logins",
        "robots": robots,
        "first": _wave_figures(robots, first_s, first_cpu),
        "again": _wave_figures(robots, again_s, again_cpu),
    }


def _wave_figures(robots: int, seconds: float, cpu_s: float) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "logins_per_s": round(robots / seconds, 1),
        "server_cpu_ms_per_login": round(cpu_s * 1000 / robots, 2),
    }


def format_logins(figures: dict[str, Any]) -> str:
    """The logins figures as a few lines of text."""
    first, again = figures["first"], figures["again"]
    return "\n".join(
        [
            f"{figures['robots']:,} robots logging in at once to spotbox run --users",
            f"first login (argon2)  {first['logins_per_s']:,}/s, {first['server_cpu_ms_per_login']} ms CPU each",
            f"again (remembered)    {again['logins_per_s']:,}/s, {again['server_cpu_ms_per_login']} ms CPU each",
        ]
    )
