"""Settings are checked as they are built: each check fires with the option named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spotbox.errors import ConfigError
from spotbox.settings import DatabaseURL, Settings


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"http_port": 70000}, "--http-port"),
        ({"mqtt_port": -1}, "--mqtt-port"),
        ({"mqtt_host": "0.0.0.0"}, "--mqtt-host"),
        ({"mqtt_host": "192.168.1.10"}, "--mqtt-host"),
        ({"schema_path": Path("/no/such/schema.json")}, "--schema"),
        ({"log_level": "chatty"}, "--log-level"),
        ({"log_format": "xml"}, "--log-format"),
        ({"batch_max": 0}, "--batch-max"),
        ({"queue_size": 0}, "--batch-max"),
        ({"retention_days": 0}, "--retention-days"),
        ({"retention_days": -7}, "--retention-days"),
        ({"retention_batch": 0}, "--retention-days"),
        ({"retention_interval_s": 0}, "--retention-days"),
        ({"database_url": "mysql://localhost/db"}, "--database-url"),
        ({"database_url": "sqlite://relative.db"}, "--database-url"),
        ({"database_url": "sqlite:///"}, "--database-url"),
        ({"database_url": "postgresql://"}, "--database-url"),
        ({"max_payload": 0}, "--max-payload"),
        ({"max_payload": 300_000_000}, "--max-payload"),
        ({"max_topic_length": 65536}, "--max-topic-length"),
        ({"max_connections": 0}, "--max-connections"),
        ({"max_streams": 0}, "--max-streams"),
        ({"max_json_depth": 1}, "--max-json-depth"),
        ({"users_path": Path("/no/such/users.json")}, "--users"),
        ({"tls_key": Path("/no/such/key.pem")}, "--tls-cert"),
        ({"tls_cert": Path("/no/such/cert.pem"), "tls_key": Path("/no/such/key.pem")}, "--tls-cert"),
    ],
)
def test_each_check_fires(changes: dict[str, Any], option: str) -> None:
    """Test that a bad value is refused when Settings are built, naming the option to change."""
    with pytest.raises(ConfigError) as caught:
        Settings(**changes)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}: ")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_mqtt_hosts_are_allowed(host: str) -> None:
    """Test that every loopback address is accepted without users."""
    assert Settings(mqtt_host=host).mqtt_host == host


@pytest.mark.parametrize(
    ("url", "scheme", "path"),
    [
        ("sqlite:///spotbox.db", "sqlite", Path("spotbox.db")),
        ("sqlite:////var/lib/spotbox/spotbox.db", "sqlite", Path("/var/lib/spotbox/spotbox.db")),
        ("postgresql://spot:secret@db:5432/spotbox", "postgresql", None),
        ("postgres://db/spotbox", "postgresql", None),
    ],
)
def test_database_urls(url: str, scheme: str, path: Path | None) -> None:
    """Test that both backends' URL forms are understood."""
    parsed = DatabaseURL.parse(url)
    assert parsed.scheme == scheme
    assert parsed.sqlite_path == path


def test_password_is_redacted_in_logs() -> None:
    """Test that the database password never reaches a log line."""
    assert DatabaseURL.parse("postgresql://spot:s3cret@db/spotbox").redacted() == "postgresql://spot:***@db/spotbox"
