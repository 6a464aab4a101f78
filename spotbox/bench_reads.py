"""`spotbox bench --scenario reads`: history requests per second against a real `spotbox run` on a filled database.

The database is filled straight through the storage layer (bulk batches, no MQTT) with `rows` statuses of
`robots` robots, one a second each. Then `connections` clients ask, each request for a random robot and a random
start, `GET /robots/{serial}/history?limit=...&start_time=...`. The load comes from wrk when it is installed (cheap
per request, so it measures the server rather than the client), else from aiohttp clients in this process.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from spotbox.bench import BenchError, cpu_seconds, peak_rss_mb, scratch_database, spotbox_server
from spotbox.settings import DatabaseURL
from spotbox.status import StatusRecord, payload_digest
from spotbox.storage import open_storage

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FILL_BATCH = 5000
DRIVE_ID = "5f0c6a53-2f4e-4d8a-9d55-2b4a3c1e7f10"


@dataclass(frozen=True)
class ReadsConfig:
    """One reads run."""

    rows: int = 1_000_000
    robots: int = 10
    limit: int = 100
    connections: int = 32
    duration_s: float = 10.0
    warmup_s: float = 2.0
    database_url: str | None = None
    client: str = "auto"  # "wrk", "aiohttp" or "auto" (wrk when installed)

    @property
    def per_robot(self) -> int:
        """Rows of each robot."""
        return self.rows // self.robots


def serial(index: int) -> str:
    """The serial number of the index-th bench robot."""
    return f"READ-{index:02d}"


def _record(robot: int, second: int) -> StatusRecord:
    ts = T0 + timedelta(seconds=second)
    moving = second % 7 != 0
    level, latitude, longitude = 1 + second % 100, 52.5 + second * 1e-6, 13.4 + robot / 100
    battery_status, driving_status = ("DISCHARGING", "MOVING") if moving else ("CHARGING", "IDLE")
    drive_id = DRIVE_ID if moving else None
    raw = orjson.dumps(
        {
            "battery_level": level,
            "battery_status": battery_status,
            "driving_status": driving_status,
            "current_drive_id": drive_id,
            "location": {"latitude": latitude, "longitude": longitude, "height": 34.0},
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
        }
    )
    received_at = ts + timedelta(milliseconds=20)
    return StatusRecord(
        serial(robot),
        ts,
        received_at,
        level,
        battery_status,
        driving_status,
        drive_id,
        latitude,
        longitude,
        34.0,
        raw,
        payload_digest(raw),
    )


async def fill(database_url: str, config: ReadsConfig) -> float:
    """Write the bench's statuses through the storage layer in large batches; the seconds it took."""
    storage = open_storage(DatabaseURL.parse(database_url))
    await storage.open()
    started = time.perf_counter()
    try:
        batch: list[StatusRecord] = []
        for second in range(config.per_robot):
            batch.extend(_record(robot, second) for robot in range(config.robots))
            if len(batch) >= FILL_BATCH:
                await storage.write_batch(batch)
                batch = []
        if batch:
            await storage.write_batch(batch)
    finally:
        await storage.close()
    if DatabaseURL.parse(database_url).scheme == "postgresql":
        # What autovacuum does to a table that has been filling for a while: statistics, and the visibility map
        # that lets history pages be index-only scans.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("VACUUM ANALYZE status")
        finally:
            await conn.close()
    return time.perf_counter() - started


_WRK_SCRIPT = """
local robots = %(robots)d
local t0 = %(t0)d
local span = %(span)d
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("id", counter)
end

function init(args)
  math.randomseed(os.time() * 1000 + id)
end

request = function()
  local robot = math.random(0, robots - 1)
  local start = os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ", t0 + math.random(0, span))
  local path = string.format("/robots/READ-%%02d/history?limit=%(limit)d&start_time=%%s", robot, start)
  return wrk.format("GET", path)
end

done = function(summary, latency, requests)
  local errors = summary.errors
  local socket_errors = errors.connect + errors.read + errors.write + errors.timeout
  io.write(string.format(
    "WRK-JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d, " ..
    "\\"max_us\\": %%d, \\"non_2xx\\": %%d, \\"socket_errors\\": %%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    errors.status, socket_errors))
end
"""


async def _drive_wrk(wrk: str, base: str, config: ReadsConfig, duration_s: float, workdir: Path) -> dict[str, Any]:
    script = workdir / "reads.lua"
    span = max(config.per_robot - config.limit, 0)
    script.write_text(
        _WRK_SCRIPT % {"robots": config.robots, "t0": int(T0.timestamp()), "span": span, "limit": config.limit}
    )
    proc = await asyncio.create_subprocess_exec(
        wrk,
        "-t2",
        f"-c{config.connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    for line in out.decode().splitlines():
        if line.startswith("WRK-JSON "):
            raw = orjson.loads(line[len("WRK-JSON ") :])
            seconds = raw["duration_us"] / 1e6
            return {
                "requests": raw["requests"],
                "seconds": round(seconds, 3),
                "requests_per_s": round(raw["requests"] / seconds, 1),
                "latency_ms": {"p50": raw["p50_us"] / 1000, "p99": raw["p99_us"] / 1000, "max": raw["max_us"] / 1000},
                "errors": raw["non_2xx"] + raw["socket_errors"],
            }
    raise BenchError(f"wrk reported no figures: {err.decode().strip() or out.decode().strip()}")


async def _drive_aiohttp(base: str, config: ReadsConfig, duration_s: float) -> dict[str, Any]:
    span = max(config.per_robot - config.limit, 0)
    latencies: list[float] = []
    errors = 0
    rng = random.Random()  # noqa: S311 - a load pattern, not a secret

    async def client(http: aiohttp.ClientSession, until: float) -> None:
        nonlocal errors
        while (now := time.perf_counter()) < until:
            start = (T0 + timedelta(seconds=rng.randint(0, span))).strftime("%Y-%m-%dT%H:%M:%SZ")
            url = f"{base}/robots/{serial(rng.randrange(config.robots))}/history"
            async with http.get(url, params={"limit": str(config.limit), "start_time": start}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - now)

    connector = aiohttp.TCPConnector(limit=config.connections)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        until = started + duration_s
        await asyncio.gather(*(client(http, until) for _ in range(config.connections)))
        seconds = time.perf_counter() - started
    cut = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies) * 1000, 2),
            "p99": round(cut[98] * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
        "errors": errors,
    }


async def drive(base: str, config: ReadsConfig, duration_s: float, workdir: Path) -> dict[str, Any]:
    """Run the read load for `duration_s`; requests, requests per second, latency p50/p99/max, errors."""
    wrk = shutil.which("wrk") if config.client in ("auto", "wrk") else None
    if config.client == "wrk" and wrk is None:
        raise BenchError("--client wrk: wrk is not installed")
    if wrk is not None:
        return {"client": "wrk", **await _drive_wrk(wrk, base, config, duration_s, workdir)}
    return {"client": "aiohttp", **await _drive_aiohttp(base, config, duration_s)}


async def run_reads(config: ReadsConfig) -> dict[str, Any]:
    """Fill a scratch database, start `spotbox run` on it, and measure history reads; the figures as a dict."""
    with tempfile.TemporaryDirectory(prefix="spotbox-bench-") as tmp:
        workdir = Path(tmp)
        async with scratch_database(config.database_url, workdir, "reads") as database_url:
            fill_s = await fill(database_url, config)
            async with spotbox_server(database_url) as server:
                base = f"http://127.0.0.1:{server.http_port}"
                if config.warmup_s > 0:
                    await drive(base, config, config.warmup_s, workdir)
                cpu_before = cpu_seconds(server.proc.pid)
                figures = await drive(base, config, config.duration_s, workdir)
                server_cpu = cpu_seconds(server.proc.pid) - cpu_before
                peak = peak_rss_mb(server.proc.pid)
    backend = DatabaseURL.parse(config.database_url).scheme if config.database_url else "sqlite"
    return {
        "scenario": "reads",
        "config": {**asdict(config), "database": backend, "database_url": None},
        "fill_s": round(fill_s, 1),
        **figures,
        # CPU time (user + system, all threads) per request: comparable across runs on a busy machine.
        "server_cpu_us_per_request": round(server_cpu / figures["requests"] * 1e6, 1) if figures["requests"] else None,
        "peak_rss_mb": round(peak, 1),
    }


def format_reads(figures: dict[str, Any]) -> str:
    """The reads figures as a few lines of text."""
    config, latency = figures["config"], figures["latency_ms"]
    return "\n".join(
        [
            f"history reads, {config['database']}, {config['rows']:,} rows of {config['robots']} robots, "
            f"limit {config['limit']}, {config['connections']} connections ({figures['client']})",
            f"requests per second  {figures['requests_per_s']:,}",
            f"latency p50 / p99 ms {latency['p50']} / {latency['p99']} (max {latency['max']})",
            f"errors               {figures['errors']}",
            f"server CPU per request (us) {figures['server_cpu_us_per_request']}",
            f"peak RSS MB          {figures['peak_rss_mb']}",
        ]
    )
