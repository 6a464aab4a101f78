"""The frozen Settings: each field is a row of the `spotbox run` options table (spotbox/options.py); values only."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from spotbox.api.proxies import parse_networks
from spotbox.cluster.client import BrokerURL
from spotbox.errors import ConfigError
from spotbox.options import (
    CLUSTER,
    FORWARD,
    LOGGING,
    NETWORK,
    OPERATIONS,
    PIPELINE,
    SECURITY,
    STORAGE,
    VALIDATION,
    at_least,
    between,
    check_values,
    option,
    positive,
    readable_file,
    tcp_port,
)
from spotbox.status import SERIAL_RE

BUNDLED_SCHEMA = Path(__file__).parent / "schemas" / "robot-status.schema.json"
LOG_FORMATS = ("text", "json")
MQTT_MAX_REMAINING_LENGTH = 268_435_455  # [MQTT-2.2.3]


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed `--database-url`: which backend, and where."""

    scheme: Literal["sqlite", "postgresql"]
    url: str
    sqlite_path: Path | None = None

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        """Parse `sqlite:///PATH` or `postgresql://user:pass@host:port/db`; raise ConfigError otherwise."""
        option = "--database-url"
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            # sqlite:///relative.db -> "relative.db"; sqlite:////abs/x.db -> "/abs/x.db"
            if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
                raise ConfigError(option, f"{url!r} is not sqlite:///PATH (relative) or sqlite:////PATH (absolute)")
            return cls("sqlite", url, Path(parts.path[1:]))
        if parts.scheme in ("postgresql", "postgres"):
            if not parts.hostname and not parts.path.strip("/"):
                raise ConfigError(option, f"{url!r} names no host and no database")
            return cls("postgresql", url)
        raise ConfigError(option, f"{url!r} is neither sqlite:///PATH nor postgresql://user:pass@host:port/db")

    def redacted(self) -> str:
        """The URL with any password replaced, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return self.url.replace(f":{parts.password}@", ":***@", 1)


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_forward_urls(urls: tuple[str, ...]) -> str | None:
    """What is wrong with the --forward targets, or None."""
    for url in urls:
        try:
            BrokerURL.parse(url, "--forward")
        except ConfigError as exc:
            return str(exc).removeprefix("--forward: ")
    return "the same target is given twice" if len(set(urls)) != len(urls) else None


def _check_networks(values: tuple[str, ...]) -> str | None:
    """What is wrong with the --trusted-proxies values, or None."""
    for value in values:
        try:
            parse_networks([value])
        except ValueError:
            return f"{value!r} is not an IP address or network (such as 10.0.0.5 or 10.0.0.0/8)"
    return None


def _check_broker_url(url: str) -> str | None:
    """What is wrong with --broker, or None."""
    try:
        BrokerURL.parse(url, "--broker")
    except ConfigError as exc:
        return str(exc).removeprefix("--broker: ")
    return None


def _check_name(name: str) -> str | None:
    """A gateway or instance name: what a serial number may be (it is part of topics and client ids)."""
    return None if SERIAL_RE.fullmatch(name) else f"{name!r} is not 1 to 64 of A-Z a-z 0-9 _ . -"


@dataclass(frozen=True)
class Settings:
    """Everything `spotbox run` needs, checked once when built; each field with `option(...)` is a `spotbox run` option.

    To add an option, add one field here: its flag, variable, --help and README row follow (see spotbox/options.py).
    """

    http_host: str = option(
        "127.0.0.1", "Address of the HTTP API, SSE feeds and MQTT over WebSocket (/mqtt).", group=NETWORK
    )
    http_port: int = option(
        8000, "HTTP port; 0 picks a free one (the real one is logged).", group=NETWORK, check=tcp_port
    )
    mqtt_host: str = option(
        "127.0.0.1", "Address of MQTT over TCP; anything but loopback needs --users.", group=NETWORK
    )
    mqtt_port: int = option(
        1883, "MQTT port; 0 picks a free one (the real one is logged).", group=NETWORK, check=tcp_port
    )
    database_url: str = option(
        "sqlite:///spotbox.db",
        "sqlite:///PATH (relative), sqlite:////PATH (absolute) or postgresql://user:pass@host:port/db.",
        group=STORAGE,
        envvars=("SPOTBOX_DATABASE_URL", "DATABASE_URL"),
    )
    retention_days: int | None = option(
        None,
        "Delete statuses whose ts is older than this many days (at start, then every --retention-interval-s).",
        group=STORAGE,
        check=at_least(1, "a positive number of days"),
        default_text="keep forever",
    )
    retention_interval_s: float = option(600.0, "Seconds between two retention sweeps.", group=STORAGE, check=positive)
    retention_batch: int = option(
        5000,
        "Most rows one retention statement deletes, so a sweep never holds the database long.",
        group=STORAGE,
        check=at_least(1),
    )
    schema_path: Path = option(
        BUNDLED_SCHEMA,
        "JSON Schema (2020-12) every status on robot/+/status is checked against.",
        group=VALIDATION,
        flag="--schema",
        envvars=("SPOTBOX_SCHEMA",),
        check=readable_file,
        default_text="bundled robot-status schema",
    )
    max_payload: int = option(
        1024 * 1024,
        "Largest MQTT payload and HTTP status body, in bytes: a bigger PUBLISH closes the connection, a body is 413.",
        group=VALIDATION,
        # The largest payload a PUBLISH can carry with the longest topic: MQTT's own limit.
        check=between(1, MQTT_MAX_REMAINING_LENGTH - 65535 - 4, " (MQTT's own limit is about 256 MiB)"),
    )
    max_topic_length: int = option(1024, "Longest MQTT topic, in bytes.", group=VALIDATION, check=between(1, 65535))
    max_connections: int = option(
        10_000,
        "Most MQTT clients logged in at once (TCP and WebSocket together); more are refused. Each holds a file "
        "descriptor: spotbox raises its soft limit of open files to the hard one and warns when that is too low.",
        group=VALIDATION,
        check=at_least(1),
    )
    max_pending_logins: int = option(
        200,
        "Most MQTT connections logging in at once (no CONNECT handled yet), apart from --max-connections; more wait "
        "their turn unread, each within its --connect-timeout-s; an address past an eighth of them leaves a quarter "
        "free.",
        group=VALIDATION,
        check=at_least(1),
    )
    connect_timeout_s: float = option(
        5.0,
        "Seconds a new MQTT connection has to send its CONNECT before it is closed.",
        group=VALIDATION,
        check=positive,
    )
    max_keepalive: int = option(
        3600,
        "Longest MQTT keep alive granted, in seconds: an MQTT 5 client asking for more, or for none, is told this one "
        "(Server Keep Alive).",
        group=VALIDATION,
        check=between(1, 65535),
    )
    receive_maximum: int = option(
        100,
        "Unacknowledged QoS 1/2 PUBLISHes an MQTT 5 client may have in flight to spotbox (announced in CONNACK; one "
        "more ends the connection with 0x93); an MQTT 3.1.1 connection is read no further while this many of its "
        "statuses wait for their commit.",
        group=VALIDATION,
        check=between(1, 65535),
    )
    max_queued: int = option(
        1000,
        "QoS 1/2 messages kept per MQTT session for a client that is offline or cannot take them yet; further ones "
        "are dropped and counted.",
        group=VALIDATION,
        check=at_least(0),
    )
    max_outbound_bytes: int = option(
        4 * 1024 * 1024,
        "Bytes an MQTT client may leave unread: past it QoS 0 messages to it are dropped (counted), and a client "
        "over it that takes no byte for 5 s is disconnected.",
        group=VALIDATION,
        check=at_least(1024),
    )
    max_json_depth: int = option(
        32,
        "Deepest nesting of objects and arrays in a status (2 is the depth of a status itself).",
        group=VALIDATION,
        check=at_least(2),
    )
    max_future_s: float = option(
        300.0,
        "Seconds a status timestamp may be ahead of its receive time (robot clock skew); later ones are refused.",
        group=VALIDATION,
        flag="--max-future",
        envvars=("SPOTBOX_MAX_FUTURE",),
        check=between(0, 366 * 86400, " seconds (a year)"),
    )
    users_path: Path | None = option(
        None,
        "MQTT users file (spotbox users add): every MQTT client, and HTTP ingest, must then log in.",
        group=SECURITY,
        flag="--users",
        envvars=("SPOTBOX_USERS",),
        default_text="none: anonymous MQTT, loopback only",
    )
    open_reads: bool = option(
        False,
        "With --users, leave the read routes (history, feeds, console) open: only behind an authenticating proxy "
        "or on a trusted network.",
        group=SECURITY,
    )
    trusted_proxies: tuple[str, ...] = option(
        (),
        "Address or network (CIDR) of a reverse proxy in front of the HTTP port; repeat the option for several (the "
        "variable takes them space-separated). A request from one counts as from the address its X-Forwarded-For "
        "names: login penalties, the loopback-only anonymous mode, logs.",
        group=SECURITY,
        check=_check_networks,
        default_text="none: the TCP peer",
    )
    tls_cert: Path | None = option(
        None,
        "PEM certificate (chain): MQTT over TCP and HTTP, so also MQTT over WebSocket, then speak TLS.",
        group=SECURITY,
    )
    tls_key: Path | None = option(None, "PEM private key of --tls-cert.", group=SECURITY)
    queue_size: int = option(
        10_000,
        "Statuses waiting for the writer; when full, MQTT publishers wait and HTTP ingest answers 503.",
        group=PIPELINE,
        check=at_least(1),
    )
    batch_max: int = option(500, "Most statuses committed in one transaction.", group=PIPELINE, check=at_least(1))
    batch_wait_ms: float = option(
        2.0,
        "Longest wait, in milliseconds, for a batch to fill once it has one status.",
        group=PIPELINE,
        check=at_least(0),
    )
    ingest_timeout_s: float = option(
        10.0,
        "HTTP ingest answers 503 when a status is not committed within this many seconds.",
        group=PIPELINE,
        check=positive,
    )
    max_streams: int = option(
        2000,
        "Most SSE feeds open at once (robot pages and /feed consoles); one more is answered 503.",
        group=PIPELINE,
        check=at_least(1),
    )
    http_idle_timeout_s: float = option(
        15.0,
        "Seconds an HTTP connection may stay without a whole request (idle between requests, or sending its headers "
        "slowly) before it is closed; also how long a request body may take to arrive (then 408).",
        group=PIPELINE,
        check=positive,
    )
    sse_ping_s: float = option(
        15.0,
        "Seconds between keep-alive comments on an idle SSE feed (keep below a proxy's idle timeout).",
        group=PIPELINE,
        check=positive,
    )
    shutdown_timeout_s: float = option(
        30.0,
        "On SIGTERM, longest wait in seconds for queued statuses to be committed before stopping anyway.",
        group=PIPELINE,
        check=positive,
    )
    log_level: str = option(
        "info", "Lowest level logged.", group=LOGGING, choices=("debug", "info", "warning", "error")
    )
    log_format: str = option("text", "text, or json: one JSON object per line.", group=LOGGING, choices=LOG_FORMATS)
    forward: tuple[str, ...] = option(
        (),
        "Upstream broker, mqtt[s]://user:pass@host:port, that gets every stored status from the database; repeat the "
        "option for several (the variable takes them space-separated).",
        group=FORWARD,
        check=_check_forward_urls,
        default_text="none",
    )
    forward_prefix: str | None = option(
        None,
        "Topic prefix upstream: statuses go to PREFIXrobot/{serial}/status.",
        group=FORWARD,
        check=lambda prefix: "a topic prefix has no wildcards" if "+" in prefix or "#" in prefix else None,
        default_text="spotbox/{gateway id}/",
    )
    gateway_id: str = option(
        socket.gethostname(),
        "This gateway's name upstream: in the topic prefix and the `gateway` user property of each message.",
        group=FORWARD,
        check=_check_name,
        default_text="the host name",
    )
    forward_rate: float = option(
        2000.0,
        "Most statuses a second sent to each --forward target, so a catch-up after an outage does not starve ingest.",
        group=FORWARD,
        check=positive,
    )
    forward_rejections: bool = option(
        True, "Also forward rejections, live, to PREFIXspotbox/rejected/{serial}.", group=FORWARD
    )
    forward_alerts: bool = option(
        True, "Also forward alert changes, live, to PREFIXspotbox/alerts/{serial}.", group=FORWARD
    )
    forward_may_drop: bool = option(
        False,
        "Let --retention-days delete statuses not yet acknowledged upstream (by default they are kept until they are).",
        group=FORWARD,
    )
    forward_ca: Path | None = option(
        None,
        "PEM file of the CA certificates that sign the mqtts:// --forward targets' certificates.",
        group=FORWARD,
        check=readable_file,
        default_text="the system's CAs",
    )
    forward_keepalive: int = option(
        30,
        "MQTT keep alive towards --forward targets, in seconds: a silent link is noticed after 1.5 times this.",
        group=FORWARD,
        check=between(1, 65535),
    )
    broker: str | None = option(
        None,
        "Cluster mode: no embedded broker; join this MQTT cluster, mqtt[s]://user:pass@host:port, as one of several "
        "instances sharing $share/spotbox/robot/+/status and one PostgreSQL database.",
        group=CLUSTER,
        check=_check_broker_url,
        default_text="none: the embedded broker",
    )
    instance_id: str = option(
        socket.gethostname(),
        "This instance's name among those sharing a database: in cluster mode its MQTT client id is "
        "spotbox-{instance id}, whose session (and what the cluster holds for it) a restart finds again; on "
        "PostgreSQL also the name its /stats counts are saved under. Unique per instance.",
        group=CLUSTER,
        check=_check_name,
        default_text="the host name",
    )
    session_expiry_s: int = option(
        3600,
        "Seconds the cluster keeps this instance's session, and the statuses queued for it, while it is away.",
        group=CLUSTER,
        check=between(0, 2**32 - 1),
    )
    cluster_inflight: int = option(
        256,
        "Most statuses the cluster sends this instance before it acknowledges them (MQTT 5 Receive Maximum).",
        group=CLUSTER,
        check=between(1, 65535),
    )
    stale_after_s: float | None = option(
        None,
        "Seconds without a status before a robot is stale.",
        group=OPERATIONS,
        flag="--stale-after",
        envvars=("SPOTBOX_STALE_AFTER",),
        check=positive,
        default_text="3x the robot's median gap, at least 10 s",
    )
    offline_after_s: float = option(
        600.0,
        "Seconds without a status before a robot is offline (the end of its MQTT connection is enough).",
        group=OPERATIONS,
        flag="--offline-after",
        envvars=("SPOTBOX_OFFLINE_AFTER",),
        check=positive,
    )
    alerts_path: Path | None = option(
        None,
        "TOML file of alert rules (see examples/alerts.toml); it replaces the built-in rules.",
        group=OPERATIONS,
        flag="--alerts",
        envvars=("SPOTBOX_ALERTS",),
        check=readable_file,
        default_text="built-in rules",
    )
    alert_webhook: str | None = option(
        None,
        "URL that each alert change is POSTed to as JSON, retried with backoff.",
        group=OPERATIONS,
        check=lambda url: None if urlsplit(url).scheme in ("http", "https") else f"{url!r} is not an http(s):// URL",
        default_text="none",
    )
    # Not options: how often time-driven presence and alert changes are looked for, and the rejections kept per
    # robot in the rejection record (tests shorten or shrink them).
    ops_tick_s: float = 1.0
    rejections_kept: int = 1000
    database: DatabaseURL = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_values(self)
        if self.users_path is None and not is_loopback(self.mqtt_host):
            # Without a users file MQTT stays on loopback with anonymous clients only.
            raise ConfigError(
                "--mqtt-host",
                f"{self.mqtt_host} is not a loopback address; without --users MQTT only listens on loopback "
                "(127.0.0.1, ::1 or localhost), like Mosquitto's local-only mode",
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert", "give both --tls-cert and --tls-key, or neither")
        if self.stale_after_s is not None and self.offline_after_s < self.stale_after_s:
            raise ConfigError("--offline-after", f"{self.offline_after_s:g} s is below --stale-after")
        if self.ops_tick_s <= 0 or self.rejections_kept < 1:
            raise ConfigError(
                "rejections_kept", "the operations tick and the rejections kept per robot must be positive"
            )
        object.__setattr__(self, "database", DatabaseURL.parse(self.database_url))
        if self.broker is not None and self.database.scheme != "postgresql":
            # Instances share their statuses through the database: a file on one box cannot be that.
            raise ConfigError("--broker", "cluster mode needs PostgreSQL: give --database-url postgresql://...")

    @property
    def forward_topic_prefix(self) -> str:
        """What every forwarded topic starts with: `--forward-prefix`, or `spotbox/{gateway id}/`."""
        return self.forward_prefix if self.forward_prefix is not None else f"spotbox/{self.gateway_id}/"
