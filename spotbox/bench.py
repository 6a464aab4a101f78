"""`spotbox bench`: the whole path over real sockets, against the classic stack in the same run.

spotbox: a real `spotbox run` subprocess; N robots publish over MQTT (loadgen: QoS 0, 1 or 2, MQTT 3.1.1 or 5);
SSE subscribers follow some robots. Since a PUBACK/PUBREC is only sent after commit, acknowledged = stored; the
row count is checked in the database afterwards all the same. At QoS 0 nothing is acknowledged: the run ends when
the database holds every status sent (or stops growing). Classic stack: Mosquitto plus `spotbox.classic` (subscribe,
validate, insert each message), same load, same kind of database.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson

from spotbox import loadgen
from spotbox.errors import SpotboxError
from spotbox.settings import DatabaseURL

LISTENING = re.compile(rb"(mqtt|http) listening on (?:http://)?[\d.]+:(\d+)")


@dataclass(frozen=True)
class BenchConfig:
    """One bench run."""

    robots: int = 10
    messages: int = 20_000
    rate: float | None = None
    window: int = 10
    sse: int = 10
    database_url: str | None = None
    baseline: bool = True
    baseline_messages: int = 3_000
    qos: int = 1
    mqtt_version: str = "3.1.1"
    # Fan-out: /feed consoles receiving every status, and robot pages (/robots/BENCH-n/feed for n from 0: the
    # first `robots` follow publishing robots, the others robots that stay silent), all reading.
    sse_consoles: int = 0
    sse_robot_pages: int = 0

    def load(self, messages: int) -> loadgen.Load:
        """The publishers' part of this run, for `messages` statuses."""
        return loadgen.Load(self.robots, messages, self.window, self.rate, self.qos, self.mqtt_version)


@dataclass
class Figures:
    """What one stack achieved."""

    stored: int
    seconds: float
    stored_per_s: float
    latency_ms: dict[str, float] | None
    peak_rss_mb: float
    rss_mb: dict[str, Any] | None = None
    fanout: dict[str, Any] | None = None


class BenchError(SpotboxError):
    """The bench could not run (a process did not start, a count did not add up)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pid: int) -> float:
    return _proc_status_mb(pid, "VmHWM")


async def _sample_rss(pid: int, samples: list[float], every_s: float = 1.0) -> None:
    """Record the server's resident memory every `every_s` seconds until cancelled."""
    while True:
        samples.append(_proc_status_mb(pid, "VmRSS"))
        await asyncio.sleep(every_s)


def _rss_growth(samples: list[float]) -> dict[str, Any] | None:
    """Memory once warmed up (after the first tenth of the run) against memory at the end: is it flat? With the
    curve at each tenth of the run, to tell a leak (steady climb) from a warm-up (climb, then flat)."""
    if len(samples) < 2:
        return None
    warm = samples[max(1, len(samples) // 10)] if len(samples) > 2 else samples[0]
    end = samples[-1]
    curve = [round(samples[i * (len(samples) - 1) // 10], 1) for i in range(11)]
    return {
        "warm": round(warm, 1),
        "end": round(end, 1),
        "growth_pct": round(100 * (end - warm) / warm, 1),
        "curve": curve,
    }


@asynccontextmanager
async def scratch_database(base: str | None, workdir: Path, name: str) -> AsyncIterator[str]:
    """An empty database of the asked kind for one run: a SQLite file in `workdir` (removed with it), or a
    PostgreSQL database on `base`'s server, dropped afterwards."""
    if base is None or DatabaseURL.parse(base).scheme == "sqlite":
        yield f"sqlite:///{workdir / f'{name}.db'}"
        return
    db = f"spotbox_bench_{name}_{os.getpid()}"
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{db}"')
    finally:
        await conn.close()
    try:
        yield urlunsplit(urlsplit(base)._replace(path=f"/{db}"))
    finally:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        finally:
            await conn.close()


async def _count_rows(database_url: str) -> int:
    database = DatabaseURL.parse(database_url)
    if database.scheme == "sqlite":
        import sqlite3  # noqa: PLC0415

        with sqlite3.connect(str(database.sqlite_path)) as db:
            return int(db.execute("SELECT count(*) FROM status").fetchone()[0])
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM status"))
    finally:
        await conn.close()


async def _stored_at(database_url: str, expected: int) -> float:
    """When the database first held `expected` rows (a QoS 0 run has no acknowledgement to time it by).

    Gives up once the count has not grown for 5 s: QoS 0 statuses may be lost, and the bench reports what was stored.
    """
    count, grew_at = -1, time.perf_counter()
    while True:
        now_count = await _count_rows(database_url)
        now = time.perf_counter()
        if now_count >= expected:
            return now
        if now_count != count:
            count, grew_at = now_count, now
        elif now - grew_at > 5:
            return grew_at
        await asyncio.sleep(0.02)


async def _follow(
    http: aiohttp.ClientSession,
    url: str,
    expect: int,
    latencies: list[tuple[float, float]],
    overflows: list[str] | None = None,
) -> None:
    """Read a feed until `expect` statuses arrived (each one's delivery latency noted), or it overflowed."""
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
        seen = 0
        if expect <= 0:
            await resp.content.read()  # a silent robot's page: held open until cancelled
            return
        async for raw in resp.content:
            if raw.startswith(b"data: "):
                received = time.time()
                doc = orjson.loads(raw[6:])
                if "ts" not in doc:
                    if overflows is not None and "error" in doc:
                        overflows.append(url)
                        return
                    continue
                ts = datetime.fromisoformat(doc["ts"]).timestamp()
                latencies.append((ts, (received - ts) * 1000))
                seen += 1
                if seen >= expect:
                    return


def _fanout_followers(
    http: aiohttp.ClientSession, base: str, config: BenchConfig, per_robot: int, overflows: list[str]
) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]], list[list[tuple[float, float]]]]:
    """Tasks reading the fan-out feeds (those that end, those held open) and each feed's latencies."""
    ending: list[asyncio.Task[None]] = []
    held: list[asyncio.Task[None]] = []
    per_feed: list[list[tuple[float, float]]] = []
    for _ in range(config.sse_consoles):
        per_feed.append([])
        follow = _follow(http, f"{base}/feed", per_robot * config.robots, per_feed[-1], overflows)
        ending.append(asyncio.create_task(follow))
    for n in range(config.sse_robot_pages):
        expect = per_robot if n < config.robots else 0
        per_feed.append([])
        follow = _follow(http, f"{base}/robots/BENCH-{n:04d}/feed", expect, per_feed[-1], overflows)
        (ending if expect else held).append(asyncio.create_task(follow))
    return ending, held, per_feed


def _fanout_figures(config: BenchConfig, per_feed: list[list[tuple[float, float]]], overflows: list[str]) -> Any:
    p99s = sorted(percentiles([latency for _, latency in feed])[1] for feed in per_feed if feed)
    return {
        "consoles": config.sse_consoles,
        "robot_pages": config.sse_robot_pages,
        "overflowed": len(overflows),
        "feed_p99_ms": {"median": round(statistics.median(p99s), 2), "max": round(p99s[-1], 2)} if p99s else None,
    }


@dataclass
class Server:
    """A running `spotbox run` subprocess and the ports it listens on."""

    proc: asyncio.subprocess.Process
    mqtt_port: int
    http_port: int


@asynccontextmanager
async def spotbox_server(database_url: str, *args: str) -> AsyncIterator[Server]:
    """`spotbox run` on free ports over `database_url` (extra `args` appended), stopped with SIGTERM on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spotbox",
        "run",
        "--mqtt-port",
        "0",
        "--http-port",
        "0",
        "--database-url",
        database_url,
        "--log-level",
        "info",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    ports: dict[bytes, int] = {}
    drain = None
    try:
        async with asyncio.timeout(30):
            while len(ports) < 2:
                line = await proc.stderr.readline()
                if not line:
                    raise BenchError("spotbox run exited before listening")
                if match := LISTENING.search(line):
                    ports[match.group(1)] = int(match.group(2))
        # Keep reading the server's log so a chatty run can never block it on a full pipe.
        drain = asyncio.create_task(proc.stderr.read(), name="bench-server-log")
        yield Server(proc, ports[b"mqtt"], ports[b"http"])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        if drain is not None:
            drain.cancel()


async def bench_spotbox(config: BenchConfig, database_url: str) -> Figures:
    """Run `spotbox run` and measure it under the configured load."""
    fanout = None
    streams = config.sse + config.sse_consoles + config.sse_robot_pages
    # Past the default --max-streams (2,000) only when the run asks for more feeds.
    args = ("--max-streams", str(streams + 10)) if streams > 1900 else ()
    async with spotbox_server(database_url, *args) as server:
        per_robot = config.messages // config.robots
        base = f"http://127.0.0.1:{server.http_port}"
        latencies: list[tuple[float, float]] = []
        overflows: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            followers = [
                asyncio.create_task(_follow(http, f"{base}/robots/BENCH-{i:04d}/feed", per_robot, latencies))
                for i in range(min(config.sse, config.robots))
            ]
            ending, held, per_feed = _fanout_followers(http, base, config, per_robot, overflows)
            await asyncio.sleep(0.5 + (config.sse_consoles + config.sse_robot_pages) / 500)  # feeds subscribe first
            rss: list[float] = []
            sampler = asyncio.create_task(_sample_rss(server.proc.pid, rss), name="bench-rss")
            try:
                result = await loadgen.drive("127.0.0.1", server.mqtt_port, config.load(per_robot * config.robots))
            finally:
                sampler.cancel()
            if result.errors:
                raise BenchError(f"{len(result.errors)} publishes refused; the first: {result.errors[0]}")
            end = result.last_ack if config.qos else await _stored_at(database_url, result.sent)
            async with asyncio.timeout(120):
                await asyncio.gather(*followers, *ending)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            if config.sse_consoles or config.sse_robot_pages:
                fanout = _fanout_figures(config, per_feed, overflows)
        peak = peak_rss_mb(server.proc.pid)
    stored = await _count_rows(database_url)
    if config.qos and stored != result.acked:
        raise BenchError(f"{result.acked} statuses acknowledged but {stored} stored")
    seconds = end - result.first_send
    figures = Figures(stored, seconds, stored / seconds, _latency_figures(latencies), peak, _rss_growth(rss))
    figures.fanout = fanout
    return figures


def percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (0.0, 0.0)
    return statistics.median(values), statistics.quantiles(values, n=100)[98]


def _latency_figures(latencies: list[tuple[float, float]]) -> dict[str, float]:
    """p50/p99 over every status followed, and over the steady state: the middle 90% by publish time.

    The first and last 5% hold the connection storm of the start and the disconnects of robots that finish,
    which a fleet that stays connected does not see; both figures are reported.
    """
    by_time = sorted(latencies)
    trim = len(by_time) // 20
    steady = [latency for _, latency in by_time[trim : len(by_time) - trim]]
    p50, p99 = percentiles([latency for _, latency in by_time])
    steady_p50, steady_p99 = percentiles(steady)
    return {"p50": p50, "p99": p99, "steady_p50": steady_p50, "steady_p99": steady_p99}


async def bench_classic(config: BenchConfig, database_url: str, workdir: Path) -> Figures | None:
    """Mosquitto plus a subscriber that inserts each message, under the same kind of load."""
    # Debian installs the broker in /usr/sbin, often not on a user's PATH.
    mosquitto = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if mosquitto is None:
        return None
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n")
    broker = await asyncio.create_subprocess_exec(mosquitto, "-c", str(conf), stderr=asyncio.subprocess.DEVNULL)
    subscriber = None
    try:
        await asyncio.sleep(0.3)
        count = config.baseline_messages
        subscriber = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "spotbox.classic",
            str(port),
            database_url,
            str(count),
            stdout=asyncio.subprocess.PIPE,
        )
        assert subscriber.stdout is not None
        async with asyncio.timeout(30):
            await subscriber.stdout.readline()  # subscribed
        started_wall = time.time()
        await loadgen.drive("127.0.0.1", port, config.load(count))
        async with asyncio.timeout(600):
            done = orjson.loads(await subscriber.stdout.readline())
        peak = peak_rss_mb(broker.pid) + peak_rss_mb(subscriber.pid)
        await subscriber.wait()
    finally:
        for proc in (subscriber, broker):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                await proc.wait()
    seconds = done["last_insert_wall"] - started_wall
    return Figures(done["stored"], seconds, done["stored"] / seconds, None, peak)


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Both stacks, one after the other, on this machine; the figures as one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="spotbox-bench-") as tmp:
        workdir = Path(tmp)
        async with scratch_database(config.database_url, workdir, "spotbox") as spotbox_db:
            spotbox = await bench_spotbox(config, spotbox_db)
        baseline = None
        if config.baseline:
            async with scratch_database(config.database_url, workdir, "classic") as classic_db:
                baseline = await bench_classic(config, classic_db, workdir)
    backend = DatabaseURL.parse(config.database_url).scheme if config.database_url else "sqlite"
    return {
        "config": {**asdict(config), "database": backend, "database_url": None},
        "stored": spotbox.stored,
        "seconds": round(spotbox.seconds, 3),
        "stored_per_s": round(spotbox.stored_per_s, 1),
        "latency_ms": {k: round(v, 2) for k, v in (spotbox.latency_ms or {}).items()},
        "peak_rss_mb": round(spotbox.peak_rss_mb, 1),
        "rss_mb": spotbox.rss_mb,
        "fanout": spotbox.fanout,
        "baseline": None
        if baseline is None
        else {
            "stored": baseline.stored,
            "seconds": round(baseline.seconds, 3),
            "stored_per_s": round(baseline.stored_per_s, 1),
            "peak_rss_mb": round(baseline.peak_rss_mb, 1),
        },
        "ratio_vs_baseline": None if baseline is None else round(spotbox.stored_per_s / baseline.stored_per_s, 2),
    }


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a small text table."""
    rows = [("", "spotbox", "classic (mosquitto + subscriber)")]
    base = figures["baseline"] or {}
    rows.append(("stored messages", str(figures["stored"]), str(base.get("stored", "-"))))
    rows.append(("stored per second", str(figures["stored_per_s"]), str(base.get("stored_per_s", "-"))))
    latency = figures["latency_ms"]
    rows.append(("publish->SSE p50 ms", str(figures["latency_ms"]["p50"]), "-"))
    rows.append(("publish->SSE p99 ms", str(figures["latency_ms"]["p99"]), "-"))
    rows.append(("  steady state p50 / p99", f"{latency['steady_p50']} / {latency['steady_p99']}", "-"))
    rows.append(("peak RSS MB", str(figures["peak_rss_mb"]), str(base.get("peak_rss_mb", "-"))))
    if figures["rss_mb"] is not None:
        growth = figures["rss_mb"]
        rows.append(("RSS warm -> end MB", f"{growth['warm']} -> {growth['end']} ({growth['growth_pct']:+}%)", "-"))
    if figures.get("fanout"):
        fanout = figures["fanout"]
        p99 = fanout["feed_p99_ms"] or {}
        rows.append(
            (
                f"fan-out {fanout['consoles']} consoles + {fanout['robot_pages']} robot pages",
                f"feed p99 median {p99.get('median')} / max {p99.get('max')} ms, {fanout['overflowed']} overflowed",
                "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    ratio = figures["ratio_vs_baseline"]
    lines.append(f"ratio vs classic stack: {ratio}x" if ratio is not None else "classic stack: not measured")
    return "\n".join(lines)
