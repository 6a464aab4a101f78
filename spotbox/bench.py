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
    # Packets encoded before the start: the lean load measures the server, not the publishers.
    pre_encoded: bool = False
    # Fan-out: /feed consoles receiving every status, and robot pages (/robots/BENCH-n/feed for n from 0: the
    # first `robots` follow publishing robots, the others robots that stay silent), all reading.
    sse_consoles: int = 0
    sse_robot_pages: int = 0
    # An alert rules file for the spotbox under test (an empty file: no rules, to measure what alerts cost).
    alerts: str | None = None

    def load(self, messages: int) -> loadgen.Load:
        """The publishers' part of this run, for `messages` statuses."""
        return loadgen.Load(
            self.robots, messages, self.window, self.rate, self.qos, self.mqtt_version, self.pre_encoded
        )


# The broker-core issue's load: a few publishers with a deep window of pre-encoded QoS 1 statuses, no feeds.
LEAN = {"robots": 3, "window": 100, "sse": 0, "pre_encoded": True, "baseline": False}


@dataclass
class Figures:
    """What one stack achieved."""

    stored: int
    seconds: float
    stored_per_s: float
    latency_ms: dict[str, float] | None
    peak_rss_mb: float
    rss_mb: dict[str, Any] | None = None
    # Publish to PUBACK/PUBCOMP (which spotbox sends after the commit), and how far apart the robots' CONNACKs came.
    ack_ms: dict[str, float] | None = None
    connect_spread_s: float | None = None
    fanout: dict[str, Any] | None = None
    # CPU seconds (user + system, all threads) the server spent during the load, per stored status: unlike a rate,
    # it hardly moves when other work shares the machine.
    server_cpu_us: float | None = None
    # The same from the moment every robot had connected: a status in a connected fleet, without the logins.
    server_cpu_us_connected: float | None = None


class BenchError(SpotboxError):
    """The bench could not run (a process did not start, a count did not add up)."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a process the bench or a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def followed(config: BenchConfig) -> list[int]:
    """The robots followed over SSE (`--sse`): spread evenly over the fleet, so over the phases of a paced load.

    A paced robot publishes at its own phase of the second, by its number: the first 20 of 10,000 robots all
    publish within the same 2 ms, so their deliveries were 20 copies of one moment a second, and the p99 of a
    30 s run was the latency of its worst moment or two.
    """
    count = min(config.sse, config.robots)
    return [i * config.robots // count for i in range(count)]


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
        event = b""
        async for raw in resp.content:
            if raw.startswith(b"event: "):
                event = raw[7:].strip()
            elif raw.startswith(b"data: ") and event == b"overflow":
                if overflows is not None:
                    overflows.append(url)
                return
            # Only statuses: a robot's feed also carries its alerts and presence.
            elif raw.startswith(b"data: ") and event == b"status":
                received = time.time()
                doc = orjson.loads(raw[6:])
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


async def bench_spotbox(
    config: BenchConfig, database_url: str, extra_args: tuple[str, ...] = (), forward: dict[str, Any] | None = None
) -> Figures:
    """Run `spotbox run` (with `extra_args`) and measure it under the configured load.

    With `forward` (a dict filled here), also time until every stored status is acknowledged upstream.
    """
    if config.alerts is not None:
        extra_args = (*extra_args, "--alerts", config.alerts)
    fanout = None
    streams = config.sse + config.sse_consoles + config.sse_robot_pages
    # Past the default --max-streams (2,000) only when the run asks for more feeds.
    args = ("--max-streams", str(streams + 10)) if streams > 1900 else ()
    async with spotbox_server(database_url, *args, *extra_args) as server:
        per_robot = config.messages // config.robots
        base = f"http://127.0.0.1:{server.http_port}"
        latencies: list[tuple[float, float]] = []
        overflows: list[str] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            followers = [
                asyncio.create_task(_follow(http, f"{base}/robots/BENCH-{i:04d}/feed", per_robot, latencies))
                for i in followed(config)
            ]
            ending, held, per_feed = _fanout_followers(http, base, config, per_robot, overflows)
            await asyncio.sleep(0.5 + (config.sse_consoles + config.sse_robot_pages) / 500)  # feeds subscribe first
            rss: list[float] = []
            sampler = asyncio.create_task(_sample_rss(server.proc.pid, rss), name="bench-rss")
            cpu_before = cpu_seconds(server.proc.pid)
            cpu_connected: list[float] = []
            try:
                result = await loadgen.drive(
                    "127.0.0.1",
                    server.mqtt_port,
                    config.load(per_robot * config.robots),
                    lambda: cpu_connected.append(cpu_seconds(server.proc.pid)),
                    collect=False,
                )
            finally:
                sampler.cancel()
            if result.errors:
                raise BenchError(f"{len(result.errors)} publishes refused; the first: {result.errors[0]}")
            end = result.last_ack if config.qos else await _stored_at(database_url, result.sent)
            cpu_after = cpu_seconds(server.proc.pid)
            server_cpu = cpu_after - cpu_before
            after_connect = cpu_after - cpu_connected[0] if cpu_connected else None
            async with asyncio.timeout(120):
                await asyncio.gather(*followers, *ending)
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)
            if config.sse_consoles or config.sse_robot_pages:
                fanout = _fanout_figures(config, per_feed, overflows)
            if forward is not None:
                drained = await _forward_drained(http, server.http_port)
                forward["forwarded_per_s"] = round(result.acked / (drained - result.first_send), 1)
                forward["drained_after_load_s"] = round(max(0.0, drained - end), 3)
        peak = peak_rss_mb(server.proc.pid)
    stored = await _count_rows(database_url)
    if config.qos and stored != result.acked:
        raise BenchError(f"{result.acked} statuses acknowledged but {stored} stored")
    seconds = end - result.first_send
    acks = [(sent, latency * 1000) for sent, latency in result.ack_latencies]
    spread = max(result.connected_at) - min(result.connected_at) if result.connected_at else None
    return Figures(
        stored,
        seconds,
        stored / seconds,
        _latency_figures(latencies),
        peak,
        _rss_growth(rss),
        _latency_figures(acks) if acks else None,
        spread,
        fanout,
        server_cpu / stored * 1e6 if stored else None,
        after_connect / stored * 1e6 if stored and after_connect is not None else None,
    )


async def _forward_drained(http: aiohttp.ClientSession, http_port: int, up: list[float] | None = None) -> float:
    """When GET /forward first showed no lag (perf_counter), polled every 10 ms; `up` gets when the link came up."""
    async with asyncio.timeout(600):
        while True:
            async with http.get(f"http://127.0.0.1:{http_port}/forward") as resp:
                [target] = (await resp.json())["targets"]
            if up is not None and not up and target["state"] == "up":
                up.append(time.perf_counter())
            if target["lag_rows"] == 0 and target["forwarded"] > 0:
                return time.perf_counter()
            await asyncio.sleep(0.01)


@asynccontextmanager
async def _mosquitto(workdir: Path, name: str, port: int | None = None) -> AsyncIterator[tuple[int, int] | None]:
    """A Mosquitto of the bench's own on `port` or a free one: (port, pid), or None when it is not installed."""
    # Debian installs the broker in /usr/sbin, often not on a user's PATH.
    mosquitto = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if mosquitto is None:
        yield None
        return
    port = port or free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\n"
        "max_queued_messages 0\n"
    )
    broker = await asyncio.create_subprocess_exec(mosquitto, "-c", str(conf), stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                break
        yield port, broker.pid
    finally:
        if broker.returncode is None:
            broker.terminate()
            await broker.wait()


async def run_forward_bench(config: BenchConfig) -> dict[str, Any]:
    """Ingest without and with store-and-forward to a local Mosquitto, one after the other in one run.

    Reports what forwarding costs ingest and how fast statuses reach the upstream broker (no rate limit).
    """
    with tempfile.TemporaryDirectory(prefix="spotbox-bench-") as tmp:
        workdir = Path(tmp)
        async with scratch_database(config.database_url, workdir, "plain") as plain_db:
            plain = await bench_spotbox(config, plain_db)
        async with (
            _mosquitto(workdir, "upstream") as upstream,
            scratch_database(config.database_url, workdir, "forward") as forward_db,
        ):
            if upstream is None:
                raise BenchError("mosquitto is not installed: it is the upstream broker of the forward bench")
            forward: dict[str, Any] = {}
            args = ("--forward", f"mqtt://127.0.0.1:{upstream[0]}", "--forward-rate", "1000000")
            forwarding = await bench_spotbox(config, forward_db, args, forward)
    backend = DatabaseURL.parse(config.database_url).scheme if config.database_url else "sqlite"
    return {
        "config": {**asdict(config), "database": backend, "database_url": None},
        "stored_per_s_without_forward": round(plain.stored_per_s, 1),
        "stored_per_s_with_forward": round(forwarding.stored_per_s, 1),
        "ingest_cost_pct": round(100 * (1 - forwarding.stored_per_s / plain.stored_per_s), 1),
        **forward,
        "stored": forwarding.stored,
    }


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
    async with _mosquitto(workdir, "classic") as broker:
        if broker is None:
            return None
        port, broker_pid = broker
        subscriber = None
        try:
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
            await loadgen.drive("127.0.0.1", port, config.load(count), collect=False)
            async with asyncio.timeout(600):
                done = orjson.loads(await subscriber.stdout.readline())
            peak = peak_rss_mb(subscriber.pid) + peak_rss_mb(broker_pid)
            await subscriber.wait()
        finally:
            if subscriber is not None and subscriber.returncode is None:
                subscriber.terminate()
                await subscriber.wait()
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
        "ack_latency_ms": {k: round(v, 2) for k, v in (spotbox.ack_ms or {}).items()},
        "connect_spread_s": None if spotbox.connect_spread_s is None else round(spotbox.connect_spread_s, 2),
        "peak_rss_mb": round(spotbox.peak_rss_mb, 1),
        "server_cpu_us_per_status": None if spotbox.server_cpu_us is None else round(spotbox.server_cpu_us, 1),
        "server_cpu_us_per_status_connected": _round(spotbox.server_cpu_us_connected, 1),
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


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


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
    if acks := figures["ack_latency_ms"]:
        rows.append(("publish->ack p50 / p99 ms", f"{acks['p50']} / {acks['p99']}", "-"))
        rows.append(("  steady state p50 / p99", f"{acks['steady_p50']} / {acks['steady_p99']}", "-"))
    rows.append(("peak RSS MB", str(figures["peak_rss_mb"]), str(base.get("peak_rss_mb", "-"))))
    if figures.get("server_cpu_us_per_status") is not None:
        rows.append(("server CPU per status (us)", str(figures["server_cpu_us_per_status"]), "-"))
    if figures.get("server_cpu_us_per_status_connected") is not None:
        rows.append(("  once all connected (us)", str(figures["server_cpu_us_per_status_connected"]), "-"))
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


async def _live_load(config: BenchConfig, server: Server, messages: int) -> dict[str, float]:
    """A paced load (`config.rate`) with SSE followers: stored per second and publish-to-SSE latency."""
    per_robot = messages // config.robots
    latencies: list[tuple[float, float]] = []
    async with aiohttp.ClientSession() as http:
        followers = [
            asyncio.create_task(
                _follow(http, f"http://127.0.0.1:{server.http_port}/robots/BENCH-{i:04d}/feed", per_robot, latencies)
            )
            for i in followed(config)
        ]
        await asyncio.sleep(0.5)  # let the feeds subscribe before the first publish
        result = await loadgen.drive(
            "127.0.0.1", server.mqtt_port, config.load(per_robot * config.robots), collect=False
        )
        async with asyncio.timeout(60):
            await asyncio.gather(*followers)
    latency = _latency_figures(latencies)
    return {
        "stored_per_s": round(result.acked / (result.last_ack - result.first_send), 1),
        "sse_p99_ms": round(latency["steady_p99"], 2),
        "_first_send": result.first_send,
    }


async def run_forward_catch_up(config: BenchConfig, backlog: int) -> dict[str, Any]:
    """An uplink outage, then its catch-up beside live ingest.

    With the upstream Mosquitto down, `backlog` statuses are stored (as fast as they come); then a paced live load
    (`config.rate`, `config.messages`) runs once with the upstream still down and once while spotbox catches up on
    the backlog after the upstream returns. Reports live ingest in both, and how fast the backlog drains.
    """
    if config.rate is None:
        raise BenchError("--forward-backlog needs --rate: the live load it measures beside the catch-up is paced")
    with tempfile.TemporaryDirectory(prefix="spotbox-bench-") as tmp:
        workdir = Path(tmp)
        upstream_port = free_port()
        args = ("--forward", f"mqtt://127.0.0.1:{upstream_port}", "--forward-keepalive", "5")
        async with (
            scratch_database(config.database_url, workdir, "catchup") as database_url,
            spotbox_server(database_url, *args) as server,
        ):
            backlog_load = loadgen.Load(config.robots, backlog, max(config.window, 50))
            fill = await loadgen.drive("127.0.0.1", server.mqtt_port, backlog_load, collect=False)
            if fill.acked != backlog:
                raise BenchError(f"only {fill.acked} of {backlog} backlog statuses were acknowledged")
            alone = await _live_load(config, server, config.messages)
            async with _mosquitto(workdir, "upstream", upstream_port) as upstream:
                if upstream is None:
                    raise BenchError("mosquitto is not installed: it is the upstream broker of the forward bench")
                back_at = time.perf_counter()
                up: list[float] = []
                async with aiohttp.ClientSession() as http:
                    during, drained = await asyncio.gather(
                        _live_load(config, server, config.messages), _forward_drained(http, server.http_port, up)
                    )
    total = backlog + 2 * config.messages
    return {
        "config": {**asdict(config), "backlog": backlog, "database_url": None},
        "live_stored_per_s_without_catch_up": alone["stored_per_s"],
        "live_stored_per_s_during_catch_up": during["stored_per_s"],
        "live_cut_pct": round(100 * (1 - during["stored_per_s"] / alone["stored_per_s"]), 1),
        "live_sse_p99_ms_without_catch_up": alone["sse_p99_ms"],
        "live_sse_p99_ms_during_catch_up": during["sse_p99_ms"],
        # The forwarder retries a lost uplink at most 10 s apart: it finds the upstream back within that.
        "reconnected_after_s": round(up[0] - back_at, 2),
        "drained_s": round(drained - up[0], 2),
        "drained_per_s": round(total / (drained - up[0]), 1),
    }
