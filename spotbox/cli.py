"""The `spotbox` command: run, simulate. The only place Settings are built and logging is configured."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import click
import orjson
from aiohttp import web

from spotbox.app import create_app
from spotbox.bench import LEAN, BenchConfig, format_table, run_bench, run_forward_bench, run_forward_catch_up
from spotbox.bench_logins import format_logins, run_logins
from spotbox.bench_reads import ReadsConfig, format_reads, run_reads
from spotbox.errors import SpotboxError
from spotbox.listeners import bind_both, raise_open_files_limit, try_lines
from spotbox.loadgen import PROTOCOL_LEVELS
from spotbox.logs import configure_logging
from spotbox.options import click_options
from spotbox.runtime import Runtime, load_runtime
from spotbox.settings import Settings
from spotbox.simulate import MQTT_VERSIONS, Fleet, FleetConfig, FleetStats
from spotbox.users_cli import users

logger = logging.getLogger(__name__)


# Options without a variable of their own read SPOTBOX_<COMMAND>_<OPTION> (SPOTBOX_BENCH_ROBOTS, say).
@click.group(context_settings={"auto_envvar_prefix": "SPOTBOX"})
@click.version_option(package_name="spotbox")
def main() -> None:
    """spotbox: MQTT broker, validation, storage, live feed and history for a robot fleet, in one process."""


main.add_command(users)


@main.command()
@click_options(Settings)
def run(**values: Any) -> None:
    """Run the broker, the ingest pipeline and the HTTP API until SIGINT or SIGTERM."""
    # Everything that can be checked is checked, and both ports bound, before the database is opened:
    # a busy port or a bad file leaves no database behind.
    try:
        settings = Settings(**values)
        runtime = load_runtime(settings)
        bound = bind_both(
            settings.http_host, settings.http_port, settings.mqtt_host, settings.mqtt_port, mqtt=settings.broker is None
        )
    except SpotboxError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log_level, settings.log_format)
    raise_open_files_limit(settings.max_connections + settings.max_pending_logins + settings.max_streams)
    collect_less()
    try:
        asyncio.run(serve(settings, dataclasses.replace(runtime, mqtt_socket=bound.mqtt), bound.http))
    except SpotboxError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bound.close()


# Collect young objects once 50,000 more are alive than were (CPython's default: 700), see `collect_less`.
GC_THRESHOLDS = (50_000, 20, 10)


def collect_less() -> None:
    """Run the cyclic garbage collector after 50,000 net new objects instead of 700.

    Reference counting frees nearly all that spotbox allocates; the collector is only there for cycles. With the
    default thresholds, objects that live a few tens of milliseconds (a status waiting for its commit, its future,
    its connection's buffers) were promoted to the oldest generation, so full collections came every few seconds
    and each walked every object of every connection (about 64 per connection, 640,000 at 10,000 robots): 19 full
    collections took 15.5 s of CPU in a 100 s run, up to 1.7 s each, and a status cost about twice the CPU.
    A young collection now walks at most 50,000 objects (about 20 ms); a full one is left for real growth.
    """
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings, runtime: Runtime, http_socket: socket.socket) -> None:
    """Start storage, pipeline and broker, then serve HTTP on the bound socket; run until a stop signal."""
    # Handlers first: a stop signal that comes while starting ends the run cleanly once started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = create_app(settings, runtime)
    # aiohttp's idle timeout also bounds a request whose headers never end (it has no header timeout of its own):
    # its default of an hour let 500 sockets trickling header lines hold their descriptors and 40 MB for good.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, keepalive_timeout=settings.http_idle_timeout_s)
    try:
        await runner.setup()
        await web.SockSite(runner, http_socket, ssl_context=runtime.ssl_context).start()
        scheme = "https" if runtime.ssl_context else "http"
        for host, port, *_ in runner.addresses:
            logger.info("http listening on %s://%s:%d", scheme, host, port)
        if runtime.mqtt_socket is not None:  # None in cluster mode: robots publish to the cluster
            users = runtime.users is not None
            watch, publish = try_lines(
                http_socket,
                runtime.mqtt_socket,
                tls_cert=settings.tls_cert,
                users=users,
                read_login=users and not settings.open_reads,
            )
            logger.info("watch a robot live: %s", watch)
            logger.info("publish a status: %s", publish)
        # What start-up made (modules, schemas, the app) lives as long as the process: no collection walks it again.
        gc.freeze()
        await stop.wait()
        logger.info("stopping")
    finally:
        await runner.cleanup()
    logger.info("stopped")


@main.command()
@click.option(
    "--robot-count",
    envvar="ROBOT_COUNT",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Robots ROBOT-001, ROBOT-002, ..., one MQTT connection each.",
)
@click.option(
    "--publish-interval-sec",
    envvar="PUBLISH_INTERVAL_SEC",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds between two statuses of one robot.",
)
@click.option(
    "--invalid-rate",
    envvar="INVALID_RATE",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of deliberately invalid statuses.",
)
@click.option(
    "--jitter-max-sec",
    envvar="JITTER_MAX_SEC",
    type=click.FloatRange(min=0),
    default=0.2,
    show_default=True,
    help="Random extra wait, up to this many seconds, after each status.",
)
@click.option(
    "--enable-stats-log/--no-stats-log",
    envvar="ENABLE_STATS_LOG",
    default=False,
    show_default=True,
    help="Log what was sent every --stats-log-interval-sec.",
)
@click.option(
    "--stats-log-interval-sec",
    envvar="STATS_LOG_INTERVAL_SEC",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between two stats lines.",
)
@click.option(
    "--mqtt-version",
    envvar="MQTT_VERSION",
    type=click.Choice(list(MQTT_VERSIONS)),
    default="5",
    show_default=True,
    help="MQTT protocol version of the robots (5: refusals come back as PUBACK reason codes, and are logged).",
)
@click.option(
    "--count",
    envvar="SPOTBOX_SIM_COUNT",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many statuses in all, not per robot (default: run until Ctrl-C).",
)
@click.option("--host", envvar="MQTT_HOST", default="127.0.0.1", show_default=True, help="MQTT broker address.")
@click.option(
    "--port",
    envvar="MQTT_PORT",
    type=click.IntRange(1, 65535),
    default=1883,
    show_default=True,
    help="MQTT port: the one spotbox run logs.",
)
@click.option("--username", envvar="MQTT_USERNAME", default=None, help="MQTT user (spotbox run --users).")
@click.option("--password", envvar="MQTT_PASSWORD", default=None, help="Password of --username.")
@click.option(
    "--qos", envvar="MQTT_QOS", type=click.IntRange(0, 2), default=1, show_default=True, help="QoS of every status."
)
@click.option(
    "--log-level",
    envvar="SPOTBOX_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
def simulate(
    robot_count: int,
    publish_interval_sec: float,
    invalid_rate: float,
    jitter_max_sec: float,
    enable_stats_log: bool,
    stats_log_interval_sec: float,
    mqtt_version: str,
    count: int | None,
    host: str,
    port: int,
    username: str | None,
    password: str | None,
    qos: int,
    log_level: str,
) -> None:
    """Run a mock robot fleet that publishes statuses to spotbox (or any MQTT broker)."""
    configure_logging(log_level, "text")
    config = FleetConfig(
        robot_count=robot_count,
        publish_interval_s=publish_interval_sec,
        invalid_rate=invalid_rate,
        jitter_max_s=jitter_max_sec,
        enable_stats_log=enable_stats_log,
        stats_log_interval_s=stats_log_interval_sec,
        mqtt_version=mqtt_version,
        count=count,
        host=host,
        port=port,
        username=username,
        password=password,
        qos=qos,
    )
    fleet = Fleet(config)
    try:
        stats = asyncio.run(_until_stopped(fleet))
    except* aiomqtt.MqttError as group:
        raise click.ClickException(f"MQTT broker {host}:{port}: {group.exceptions[0]}") from None
    click.echo(f"sent {stats.valid + stats.invalid} statuses ({stats.invalid} invalid, {stats.failed} failed)")
    if stats.invalid and not stats.refused and mqtt_version == "5" and qos:
        # spotbox answers each invalid MQTT 5 status with 0x99; a plain broker acknowledges anything.
        click.echo(
            f"warning: none of the {stats.invalid} invalid statuses was refused: {host}:{port} is not spotbox's MQTT "
            "port (the port of the mosquitto_pub line spotbox logs), or spotbox does not validate them",
            err=True,
        )
    # Without --count, Ctrl-C is how a run ends: a success, like ping's. Stopped short of --count, the asked-for
    # work is not done: 128 + the signal, as the shell reports a program a signal ended.
    if fleet.stopped_by is not None and count is not None:
        sys.exit(128 + fleet.stopped_by)


async def _until_stopped(fleet: Fleet) -> FleetStats:
    """Run the fleet; SIGINT (Ctrl-C) or SIGTERM stops it with its summary, a second one aborts at once."""
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        for each in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(each)
        fleet.stop(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    return await fleet.run()


@main.command()
@click.option("--robots", type=click.IntRange(min=1), default=10, show_default=True, help="Publishing robots.")
@click.option("--messages", type=click.IntRange(min=1), default=20_000, show_default=True, help="Statuses in all.")
@click.option(
    "--rate", type=click.FloatRange(min=1), default=None, help="Paced total rate per second (default: flat out)."
)
@click.option("--window", type=click.IntRange(min=1), default=10, show_default=True, help="Unacknowledged per robot.")
@click.option("--sse", type=click.IntRange(min=0), default=10, show_default=True, help="Robots followed over SSE.")
@click.option(
    "--database-url", default=None, help="Where to store (a fresh database is made next to it); default SQLite."
)
@click.option("--baseline/--no-baseline", default=True, show_default=True, help="Also measure Mosquitto + subscriber.")
@click.option("--baseline-messages", type=click.IntRange(min=1), default=3_000, show_default=True)
@click.option("--qos", type=click.IntRange(0, 2), default=1, show_default=True, help="QoS of every publish.")
@click.option(
    "--mqtt-version",
    type=click.Choice(sorted(PROTOCOL_LEVELS)),
    default="3.1.1",
    show_default=True,
    help="Protocol the robots speak.",
)
@click.option(
    "--forward",
    is_flag=True,
    help="Measure store and forward instead: ingest without and with --forward to a local Mosquitto, "
    "and how fast statuses reach it.",
)
@click.option(
    "--forward-backlog",
    type=int,
    default=None,
    help="With --forward: store this many statuses while the upstream is down, then measure the paced live load "
    "(--rate, --messages) without and during the catch-up.",
)
@click.option(
    "--sse-consoles", type=click.IntRange(min=0), default=0, show_default=True, help="Fan-out: /feed readers."
)
@click.option(
    "--sse-robot-pages",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Fan-out: robot page feeds, one robot each (the first --robots publish, the others stay silent).",
)
@click.option(
    "--scenario",
    type=click.Choice(["ingest", "reads", "logins"]),
    default="ingest",
    show_default=True,
    help="ingest: robots publish over MQTT; reads: history requests against a filled database; logins: --robots "
    "log in at once to spotbox run --users, then again.",
)
@click.option(
    "--rows", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="reads: statuses stored first."
)
@click.option(
    "--connections", type=click.IntRange(min=1), default=32, show_default=True, help="reads: concurrent clients."
)
@click.option(
    "--duration", type=click.FloatRange(min=1), default=10.0, show_default=True, help="reads: seconds of load."
)
@click.option(
    "--client",
    type=click.Choice(["auto", "wrk", "aiohttp"]),
    default="auto",
    show_default=True,
    help="reads: load generator (auto: wrk when installed, else aiohttp in this process).",
)
@click.option(
    "--lean",
    is_flag=True,
    help="The ingest-speed load: 3 publishers, 100 in flight each, pre-encoded packets, no SSE, no classic stack "
    "(overrides --robots, --window, --sse, --baseline).",
)
@click.option(
    "--alerts",
    "alerts_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Alert rules of the spotbox under test (an empty file runs it without rules).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(
    robots: int,
    messages: int,
    rate: float | None,
    window: int,
    sse: int,
    database_url: str | None,
    baseline: bool,
    baseline_messages: int,
    qos: int,
    mqtt_version: str,
    forward: bool,
    forward_backlog: int | None,
    sse_consoles: int,
    sse_robot_pages: int,
    scenario: str,
    rows: int,
    connections: int,
    duration: float,
    client: str,
    lean: bool,
    alerts_path: Path | None,
    as_json: bool,
) -> None:
    """Measure stored statuses per second, publish-to-SSE latency and memory, against the classic stack.

    With --scenario reads: history requests per second and their latency, on a database filled with --rows.
    With --scenario logins: how fast --robots log in with a password, the first time and again.
    """
    configure_logging("warning", "text")
    if scenario == "logins":
        try:
            logins = asyncio.run(run_logins(robots, database_url))
        except SpotboxError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(orjson.dumps(logins).decode() if as_json else format_logins(logins))
        return
    if scenario == "reads":
        reads = ReadsConfig(
            rows=rows,
            robots=robots,
            connections=connections,
            duration_s=duration,
            database_url=database_url,
            client=client,
        )
        try:
            figures = asyncio.run(run_reads(reads))
        except SpotboxError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(orjson.dumps(figures).decode() if as_json else format_reads(figures))
        return
    config = BenchConfig(
        robots,
        messages,
        rate,
        window,
        sse,
        database_url,
        baseline,
        baseline_messages,
        qos,
        mqtt_version,
        sse_consoles=sse_consoles,
        sse_robot_pages=sse_robot_pages,
    )
    if lean:
        config = dataclasses.replace(config, **LEAN)  # type: ignore[arg-type]
    if alerts_path is not None:
        config = dataclasses.replace(config, alerts=str(alerts_path))
    # The load generator holds every robot's connection and every latency it measured (300,000 tuples in a
    # 10,000-robot run), all tracked by the collector: with CPython's default thresholds its full collections
    # walk them all, and a client stalled by its collector measures the stall as the server's latency.
    collect_less()
    try:
        if forward_backlog is not None:
            figures = asyncio.run(run_forward_catch_up(config, forward_backlog))
        else:
            figures = asyncio.run(run_forward_bench(config) if forward else run_bench(config))
    except SpotboxError as exc:
        raise click.ClickException(str(exc)) from None
    if (forward or forward_backlog is not None) and not as_json:
        click.echo("\n".join(f"{key}: {value}" for key, value in figures.items() if key != "config"))
        return
    click.echo(orjson.dumps(figures).decode() if as_json else format_table(figures))


def _show_envvars(command: click.Command) -> None:
    """Make every flag of every command name its environment variable in --help."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.is_eager:
            param.show_envvar = True
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _show_envvars(sub)


_show_envvars(main)
