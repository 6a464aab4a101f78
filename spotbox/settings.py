"""The one frozen Settings object; built by the CLI (or a test) and checked as it is built."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from spotbox.errors import ConfigError
from spotbox.users import Users

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


def _check_port(option: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(option, f"{port} is not a TCP port (0 to 65535; 0 picks a free one)")


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _server_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The TLS context of both listeners, or None without a certificate."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--tls-cert", "give both --tls-cert and --tls-key, or neither")
    # The default server context: TLS 1.2 or later, the library's vetted cipher choice.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--tls-cert", f"cannot load the certificate {cert} with the key {key}: {exc}") from None
    return context


@dataclass(frozen=True)
class Settings:
    """Everything `spotbox run` needs, checked once when built."""

    http_host: str = "127.0.0.1"
    http_port: int = 8000
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    database_url: str = "sqlite:///spotbox.db"
    schema_path: Path = BUNDLED_SCHEMA
    log_level: str = "info"
    log_format: str = "text"
    # The ingest pipeline: a bounded queue drained by one writer in batches.
    queue_size: int = 10_000
    batch_max: int = 500
    batch_wait_ms: float = 5.0
    sse_ping_s: float = 15.0
    shutdown_timeout_s: float = 30.0
    # HTTP ingest answers 503 when a status is not committed within this time, rather than holding the request.
    ingest_timeout_s: float = 10.0
    # Rows with ts older than this many days are deleted; None keeps them forever.
    retention_days: int | None = None
    retention_interval_s: float = 600.0
    retention_batch: int = 5000
    # MQTT users (SPEC section 7): None is the local-only anonymous mode.
    users_path: Path | None = None
    # Input limits (SPEC section 7): each refusal is logged with its reason.
    max_payload: int = 1024 * 1024
    max_topic_length: int = 1024
    max_connections: int = 1000
    max_json_depth: int = 32
    # Per session: QoS 1/2 messages kept for a client that is offline or cannot take them yet; then dropped, counted.
    max_queued: int = 1000
    # Unacknowledged QoS 1/2 PUBLISHes an MQTT 5 client may have in flight to spotbox (announced in CONNACK).
    receive_maximum: int = 100
    # The longest keep alive spotbox grants an MQTT 5 client (Server Keep Alive), in seconds.
    max_keepalive: int = 3600
    # A connection must send its CONNECT within this time; at most this many may be logging in at once.
    connect_timeout_s: float = 5.0
    max_pending_logins: int = 200
    # Bytes a client may leave unread before QoS 0 messages to it are dropped (and, if it stays stuck, it is cut).
    max_outbound_bytes: int = 4 * 1024 * 1024
    # TLS for MQTT over TCP and for HTTP (so also MQTT over WebSocket): both files, or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    database: DatabaseURL = field(init=False, repr=False)
    ssl_context: ssl.SSLContext | None = field(init=False, repr=False, compare=False)
    users: Users | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_port("--http-port", self.http_port)
        _check_port("--mqtt-port", self.mqtt_port)
        users = Users.load(self.users_path) if self.users_path is not None else None
        if users is not None and not users.by_name:
            raise ConfigError("--users", f"{self.users_path} has no users; add one with spotbox users add NAME")
        if users is None and not is_loopback(self.mqtt_host):
            # SPEC 7: without a users file MQTT stays on loopback with anonymous clients only.
            raise ConfigError(
                "--mqtt-host",
                f"{self.mqtt_host} is not a loopback address; without --users MQTT only listens on loopback "
                "(127.0.0.1, ::1 or localhost), like Mosquitto's local-only mode",
            )
        object.__setattr__(self, "users", users)
        if not self.schema_path.is_file():
            raise ConfigError("--schema", f"{self.schema_path} is not a readable file")
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ConfigError("--log-level", f"{self.log_level!r} is not one of debug, info, warning, error")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError("--log-format", f"{self.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        if self.queue_size < 1 or self.batch_max < 1 or self.batch_wait_ms < 0:
            raise ConfigError("--batch-max", "queue size and batch size must be positive, the batch wait not negative")
        if self.retention_days is not None and self.retention_days < 1:
            raise ConfigError("--retention-days", f"{self.retention_days} is not a positive number of days")
        if self.retention_batch < 1 or self.retention_interval_s <= 0:
            raise ConfigError("--retention-days", "the retention batch and interval must be positive")
        if not 1 <= self.max_payload <= MQTT_MAX_REMAINING_LENGTH - 65535 - 4:
            raise ConfigError("--max-payload", f"{self.max_payload} is not from 1 to 256 MiB (MQTT's own limit)")
        if not 1 <= self.max_topic_length <= 65535:
            raise ConfigError("--max-topic-length", f"{self.max_topic_length} is not from 1 to 65535")
        if self.max_connections < 1:
            raise ConfigError("--max-connections", f"{self.max_connections} is not a positive number")
        _check_engine(self)
        if self.max_json_depth < 2:
            raise ConfigError("--max-json-depth", f"{self.max_json_depth} is below 2, the depth of a status")
        object.__setattr__(self, "database", DatabaseURL.parse(self.database_url))
        object.__setattr__(self, "ssl_context", _server_ssl_context(self.tls_cert, self.tls_key))


def _check_engine(settings: Settings) -> None:
    """The MQTT engine's settings (moved into the options table once it exists)."""
    if settings.max_queued < 0:
        raise ConfigError("--max-queued", f"{settings.max_queued} is negative")
    if not 1 <= settings.receive_maximum <= 65535:
        raise ConfigError("--receive-maximum", f"{settings.receive_maximum} is not from 1 to 65535")
    if not 1 <= settings.max_keepalive <= 65535:
        raise ConfigError("--max-keepalive", f"{settings.max_keepalive} is not from 1 to 65535 seconds")
    if settings.connect_timeout_s <= 0:
        raise ConfigError("--connect-timeout", f"{settings.connect_timeout_s} is not a positive number of seconds")
    if settings.max_pending_logins < 1:
        raise ConfigError("--max-pending-logins", f"{settings.max_pending_logins} is not a positive number")
    if settings.max_outbound_bytes < 1024:
        raise ConfigError("--max-outbound-bytes", f"{settings.max_outbound_bytes} is below 1024 bytes")
