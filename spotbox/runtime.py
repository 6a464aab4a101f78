"""What the settings point to, read once at start-up: users, TLS certificate, schema, and the bound MQTT socket."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from jsonschema.exceptions import SchemaError

from spotbox.errors import ConfigError
from spotbox.settings import Settings
from spotbox.users import Users
from spotbox.validation import StatusValidator


@dataclass(frozen=True)
class Runtime:
    """The files the settings name, read and checked; Settings themselves only hold values."""

    validator: StatusValidator
    users: Users | None = None
    ssl_context: ssl.SSLContext | None = None
    # Bound by `spotbox run` before storage is opened; None: the broker binds --mqtt-host/--mqtt-port itself.
    mqtt_socket: socket.socket | None = None


def load_runtime(settings: Settings) -> Runtime:
    """Read the schema, the users file and the TLS files the settings name; ConfigError names the option."""
    users = Users.load(settings.users_path) if settings.users_path is not None else None
    if users is not None and not users.by_name:
        raise ConfigError("--users", f"{settings.users_path} has no users; add one with spotbox users add NAME")
    return Runtime(
        _validator(settings),
        users,
        _server_ssl_context(settings.tls_cert, settings.tls_key),
    )


def _validator(settings: Settings) -> StatusValidator:
    try:
        return StatusValidator(
            settings.schema_path,
            max_depth=settings.max_json_depth,
            max_future=timedelta(seconds=settings.max_future_s),
        )
    except ConfigError as exc:
        cause = exc.__cause__
        if not isinstance(cause, SchemaError):
            raise
        # jsonschema's own text is a multi-line dump of the metaschema: one line says what and where is wrong.
        where = cause.json_path if cause.path else "the top level"
        raise ConfigError(
            "--schema", f"{settings.schema_path} is not a JSON Schema 2020-12 document: {cause.message} (at {where})"
        ) from exc


def _server_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The TLS context of both listeners, or None without a certificate."""
    if cert is None or key is None:
        return None
    # The default server context: TLS 1.2 or later, the library's vetted cipher choice.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--tls-cert", f"cannot load the certificate {cert} with the key {key}: {exc}") from None
    return context
