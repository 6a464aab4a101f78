"""The `spotbox` command: run, simulate. The only place Settings are built and logging is configured."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import aiomqtt
import click
import orjson
from aiohttp import web

from spotbox.app import create_app
from spotbox.bench import BenchConfig, format_table, run_bench
from spotbox.bench_reads import ReadsConfig, format_reads, run_reads
from spotbox.errors import ConfigError, ListenError, SpotboxError
from spotbox.loadgen import PROTOCOL_LEVELS
from spotbox.logs import configure_logging
from spotbox.settings import BUNDLED_SCHEMA, LOG_FORMATS, Settings
from spotbox.simulate import MQTT_VERSIONS, Fleet, FleetConfig
from spotbox.users_cli import users

logger = logging.getLogger(__name__)


@click.group()
@click.version_option(package_name="spotbox")
def main() -> None:
    """spotbox: MQTT broker, validation, storage, live feed and history for a robot fleet, in one process."""


main.add_command(users)


@main.command()
@click.option(
    "--http-host",
    envvar="SPOTBOX_HTTP_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address of the HTTP API, SSE feeds and MQTT over WebSocket (/mqtt).",
)
@click.option(
    "--http-port",
    envvar="SPOTBOX_HTTP_PORT",
    type=int,
    default=8000,
    show_default=True,
    help="HTTP port; 0 picks a free one.",
)
@click.option(
    "--mqtt-host",
    envvar="SPOTBOX_MQTT_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address of MQTT over TCP; anything but loopback needs --users.",
)
@click.option(
    "--mqtt-port",
    envvar="SPOTBOX_MQTT_PORT",
    type=int,
    default=1883,
    show_default=True,
    help="MQTT port; 0 picks a free one.",
)
@click.option(
    "--database-url",
    envvar=["SPOTBOX_DATABASE_URL", "DATABASE_URL"],
    default="sqlite:///spotbox.db",
    show_default=True,
    help="sqlite:///PATH or postgresql://user:pass@host:port/db",
)
@click.option(
    "--schema",
    "schema_path",
    envvar="SPOTBOX_SCHEMA",
    type=click.Path(path_type=Path),
    default=BUNDLED_SCHEMA,
    show_default="bundled robot-status schema",
    help="JSON Schema (2020-12) for robot/+/status.",
)
@click.option(
    "--users",
    "users_path",
    envvar="SPOTBOX_USERS",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    show_default="none: anonymous MQTT, loopback only",
    help="MQTT users file (spotbox users add): every MQTT client, and HTTP ingest, must then log in.",
)
@click.option(
    "--tls-cert",
    envvar="SPOTBOX_TLS_CERT",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM certificate (chain): MQTT over TCP and HTTP, so also MQTT over WebSocket, then speak TLS.",
)
@click.option(
    "--tls-key",
    envvar="SPOTBOX_TLS_KEY",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--max-payload",
    envvar="SPOTBOX_MAX_PAYLOAD",
    type=int,
    default=1024 * 1024,
    show_default=True,
    help="Largest MQTT payload and HTTP status body, in bytes: a bigger PUBLISH closes the connection, a body is 413.",
)
@click.option(
    "--max-topic-length",
    envvar="SPOTBOX_MAX_TOPIC_LENGTH",
    type=int,
    default=1024,
    show_default=True,
    help="Longest MQTT topic in bytes.",
)
@click.option(
    "--max-connections",
    envvar="SPOTBOX_MAX_CONNECTIONS",
    type=int,
    default=1000,
    show_default=True,
    help="Most MQTT clients connected at once (TCP and WebSocket); more are refused.",
)
@click.option(
    "--max-streams",
    envvar="SPOTBOX_MAX_STREAMS",
    type=int,
    default=2000,
    show_default=True,
    help="Most SSE feeds open at once (robot pages and /feed consoles); more are answered 503.",
)
@click.option(
    "--max-json-depth",
    envvar="SPOTBOX_MAX_JSON_DEPTH",
    type=int,
    default=32,
    show_default=True,
    help="Deepest nesting of objects and arrays in a status.",
)
@click.option(
    "--log-level",
    envvar="SPOTBOX_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format", envvar="SPOTBOX_LOG_FORMAT", default="text", show_default=True, type=click.Choice(LOG_FORMATS)
)
@click.option(
    "--batch-max",
    envvar="SPOTBOX_BATCH_MAX",
    type=int,
    default=500,
    show_default=True,
    help="Most statuses committed in one transaction.",
)
@click.option(
    "--batch-wait-ms",
    envvar="SPOTBOX_BATCH_WAIT_MS",
    type=float,
    default=5.0,
    show_default=True,
    help="Longest wait for a batch to fill once it has one status.",
)
@click.option(
    "--retention-days",
    envvar="SPOTBOX_RETENTION_DAYS",
    type=int,
    default=None,
    show_default="keep forever",
    help="Delete statuses whose ts is older than this many days (at start, then every 10 minutes).",
)
def run(
    http_host: str,
    http_port: int,
    mqtt_host: str,
    mqtt_port: int,
    database_url: str,
    schema_path: Path,
    log_level: str,
    log_format: str,
    batch_max: int,
    batch_wait_ms: float,
    retention_days: int | None,
    users_path: Path | None,
    max_payload: int,
    max_topic_length: int,
    max_connections: int,
    max_streams: int,
    max_json_depth: int,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run the broker, the ingest pipeline and the HTTP API until SIGINT or SIGTERM."""
    try:
        settings = Settings(
            http_host=http_host,
            http_port=http_port,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            database_url=database_url,
            schema_path=schema_path,
            log_level=log_level,
            log_format=log_format,
            batch_max=batch_max,
            batch_wait_ms=batch_wait_ms,
            retention_days=retention_days,
            users_path=users_path,
            max_payload=max_payload,
            max_topic_length=max_topic_length,
            max_connections=max_connections,
            max_streams=max_streams,
            max_json_depth=max_json_depth,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except SpotboxError as exc:
        raise click.ClickException(str(exc)) from None


async def serve(settings: Settings) -> None:
    """Start everything, log the real listening addresses, and run until a stop signal."""
    app = create_app(settings)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.http_host, settings.http_port, ssl_context=settings.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                "HTTP", settings.http_host, settings.http_port, "--http-port (or --http-host)", exc
            ) from exc
        scheme = "https" if settings.ssl_context else "http"
        for host, port, *_ in runner.addresses:
            logger.info("http listening on %s://%s:%d", scheme, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("stopping")
    finally:
        await runner.cleanup()
    logger.info("stopped")


@main.command()
@click.option("--robot-count", envvar="ROBOT_COUNT", type=click.IntRange(min=1), default=2, show_default=True)
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
@click.option("--jitter-max-sec", envvar="JITTER_MAX_SEC", type=click.FloatRange(min=0), default=0.2, show_default=True)
@click.option("--enable-stats-log/--no-stats-log", envvar="ENABLE_STATS_LOG", default=False, show_default=True)
@click.option(
    "--stats-log-interval-sec",
    envvar="STATS_LOG_INTERVAL_SEC",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
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
    help="Stop after this many statuses in all (default: run until interrupted).",
)
@click.option("--host", envvar="MQTT_HOST", default="127.0.0.1", show_default=True)
@click.option("--port", envvar="MQTT_PORT", type=click.IntRange(1, 65535), default=1883, show_default=True)
@click.option("--username", envvar="MQTT_USERNAME", default=None)
@click.option("--password", envvar="MQTT_PASSWORD", default=None)
@click.option("--qos", envvar="MQTT_QOS", type=click.IntRange(0, 2), default=1, show_default=True)
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
    try:
        stats = asyncio.run(Fleet(config).run())
    except* aiomqtt.MqttError as group:
        raise click.ClickException(f"MQTT broker {host}:{port}: {group.exceptions[0]}") from None
    click.echo(f"sent {stats.valid + stats.invalid} statuses ({stats.invalid} invalid, {stats.failed} failed)")


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
    type=click.Choice(["ingest", "reads"]),
    default="ingest",
    show_default=True,
    help="ingest: robots publish over MQTT; reads: history requests against a filled database.",
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
    sse_consoles: int,
    sse_robot_pages: int,
    scenario: str,
    rows: int,
    connections: int,
    duration: float,
    client: str,
    as_json: bool,
) -> None:
    """Measure stored statuses per second, publish-to-SSE latency and memory, against the classic stack.

    With --scenario reads: history requests per second and their latency, on a database filled with --rows.
    """
    configure_logging("warning", "text")
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
        sse_consoles,
        sse_robot_pages,
    )
    try:
        figures = asyncio.run(run_bench(config))
    except SpotboxError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(orjson.dumps(figures).decode() if as_json else format_table(figures))
