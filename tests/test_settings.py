"""Settings are checked as they are built: each check fires with the option named."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from spotbox.cli import main
from spotbox.errors import ConfigError
from spotbox.options import README, at_least, check_values, click_options, option, readme_table, replace_table, rows
from spotbox.runtime import load_runtime
from spotbox.settings import DatabaseURL, Settings

# One bad value per check; test_every_check_is_provoked keeps this list complete.
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"http_port": 70000}, "--http-port"),
    ({"mqtt_port": -1}, "--mqtt-port"),
    ({"mqtt_host": "0.0.0.0"}, "--mqtt-host"),
    ({"mqtt_host": "192.168.1.10"}, "--mqtt-host"),
    ({"schema_path": Path("/no/such/schema.json")}, "--schema"),
    ({"log_level": "chatty"}, "--log-level"),
    ({"log_format": "xml"}, "--log-format"),
    ({"batch_max": 0}, "--batch-max"),
    ({"batch_wait_ms": -1}, "--batch-wait-ms"),
    ({"queue_size": 0}, "--queue-size"),
    ({"ingest_timeout_s": 0}, "--ingest-timeout-s"),
    ({"sse_ping_s": 0}, "--sse-ping-s"),
    ({"http_idle_timeout_s": 0}, "--http-idle-timeout-s"),
    ({"shutdown_timeout_s": -1}, "--shutdown-timeout-s"),
    ({"retention_days": 0}, "--retention-days"),
    ({"retention_days": -7}, "--retention-days"),
    ({"retention_batch": 0}, "--retention-batch"),
    ({"retention_interval_s": 0}, "--retention-interval-s"),
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
    ({"max_future_s": -1.0}, "--max-future"),
    ({"max_pending_logins": 0}, "--max-pending-logins"),
    ({"connect_timeout_s": 0}, "--connect-timeout-s"),
    ({"max_keepalive": 0}, "--max-keepalive"),
    ({"receive_maximum": 0}, "--receive-maximum"),
    ({"receive_maximum": 65536}, "--receive-maximum"),
    ({"max_queued": -1}, "--max-queued"),
    ({"max_outbound_bytes": 100}, "--max-outbound-bytes"),
    ({"tls_key": Path("/no/such/key.pem")}, "--tls-cert"),
    ({"forward": ("http://cloud.example",)}, "--forward"),
    ({"forward": ("mqtt://a", "mqtt://a")}, "--forward"),
    ({"trusted_proxies": ("10.0.0.1", "proxy.local")}, "--trusted-proxies"),
    ({"forward_prefix": "cloud/+/"}, "--forward-prefix"),
    ({"gateway_id": "gw/1"}, "--gateway-id"),
    ({"forward_rate": 0}, "--forward-rate"),
    ({"forward_keepalive": 0}, "--forward-keepalive"),
    ({"forward_ca": Path("/no/such/ca.pem")}, "--forward-ca"),
    ({"broker": "http://cluster.example"}, "--broker"),
    ({"broker": "mqtt://cluster.example"}, "--broker"),  # on SQLite: cluster mode needs PostgreSQL
    ({"instance_id": "a b"}, "--instance-id"),
    ({"session_expiry_s": -1}, "--session-expiry-s"),
    ({"cluster_inflight": 0}, "--cluster-inflight"),
    ({"stale_after_s": 0.0}, "--stale-after"),
    ({"offline_after_s": 0.0}, "--offline-after"),
    ({"alerts_path": Path("/no/such/rules.toml")}, "--alerts"),
    ({"alert_webhook": "ftp://example.org/hook"}, "--alert-webhook"),
]


@pytest.mark.parametrize(("changes", "option"), BAD_VALUES)
def test_each_check_fires(changes: dict[str, Any], option: str) -> None:
    """Test that a bad value is refused when Settings are built, naming the option to change."""
    with pytest.raises(ConfigError) as caught:
        Settings(**changes)
    assert caught.value.option == option
    assert str(caught.value).startswith(f"{option}: ")


def test_every_check_is_provoked() -> None:
    """Test that each option with a check or choices has a bad value above, refused under its own flag."""
    checked = {row.name: row.flag for row in rows(Settings) if row.option.check or row.option.choices}
    provoked = {name: option for changes, option in BAD_VALUES for name in changes}
    assert {name: provoked.get(name) for name in checked} == checked


@pytest.mark.parametrize(
    ("changes", "option", "expected"),
    [
        ({"users_path": Path("/no/such/users.json")}, "--users", "no such file"),
        ({"tls_cert": Path("/no/such/cert.pem"), "tls_key": Path("/no/such/key.pem")}, "--tls-cert", "cannot load"),
    ],
)
def test_files_are_read_when_the_runtime_is_loaded(changes: dict[str, Any], option: str, expected: str) -> None:
    """Test that Settings only hold paths, and load_runtime reads them, naming the option of an unreadable file."""
    settings = Settings(**changes)
    with pytest.raises(ConfigError) as caught:
        load_runtime(settings)
    assert caught.value.option == option
    assert expected in str(caught.value)


def test_readme_settings_table_is_generated_from_the_rows() -> None:
    """Test that README's settings table is the one the Settings rows generate (python -m spotbox.options)."""
    readme = README.read_text(encoding="utf-8")
    assert replace_table(readme, readme_table(Settings)) == readme, "README is stale: run python -m spotbox.options"


def test_every_option_is_a_flag_with_its_variable_in_help() -> None:
    """Test that spotbox run has one flag per row, and --help names each flag's environment variable."""
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for row in rows(Settings):
        assert row.flag in result.output
        for variable in row.envvars:
            assert variable in result.output


def test_the_environment_sets_an_option() -> None:
    """Test that a row's environment variable reaches Settings as the flag would (a bad value names the flag)."""
    result = CliRunner().invoke(main, ["run"], env={"SPOTBOX_QUEUE_SIZE": "0"})
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --queue-size: 0 is below 1"


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


def _commands(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(main)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(path) or "spotbox" for path, _ in COMMANDS])
def test_every_flag_of_every_command_names_its_variable(path: tuple[str, ...], command: click.Command) -> None:
    """Test that each flag in each command's --help names the environment variable it also reads."""
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=400)
    assert result.exit_code == 0
    ctx = main.make_context("spotbox", ["--help"], resilient_parsing=True)
    for name in path:
        ctx = click.Context(ctx.command.commands[name], parent=ctx, info_name=name)  # type: ignore[attr-defined]
    for flag in [param for param in command.params if isinstance(param, click.Option) and not param.is_eager]:
        record = flag.get_help_record(ctx)
        assert record is not None
        assert "env var: " in record[1], record
        # What --help prints is that record.
        assert " ".join(record[1].split()) in " ".join(result.output.split())


def test_every_mqtt_example_names_the_port() -> None:
    """Test that each MQTT command in README and docs names its port: without it, another broker on 1883 gets it."""
    documents = [README, *README.parent.joinpath("docs").glob("*.md")]
    commands = [
        line
        for document in documents
        for line in document.read_text(encoding="utf-8").splitlines()
        if re.search(r"\b(mosquitto_pub|mosquitto_sub|spotbox simulate)\b", line) and "`" not in line
    ]
    assert commands
    for line in commands:
        assert re.search(r" (-p|--port) \d+", line), line


@dataclass(frozen=True)
class Sample:
    """A settings class of three rows, as another part of spotbox would add them."""

    rate: float | None = option(None, "Rate.", group="G", check=at_least(1), default_text="unlimited")
    verbose: bool = option(False, "Talk more.", group="G")
    mode: str = option("a", "Mode.", group="G", choices=("a", "b"), envvars=("MODE",))

    def __post_init__(self) -> None:
        check_values(self)


def test_a_row_is_a_flag_a_variable_and_a_check() -> None:
    """Test that one option(...) field gives a typed flag (bool: --x/--no-x), its variable, and its check."""
    seen: list[Sample] = []

    @click.command()
    @click_options(Sample)
    def command(**values: Any) -> None:
        seen.append(Sample(**values))

    runner = CliRunner()
    assert runner.invoke(command, ["--rate", "2.5", "--verbose"], env={"MODE": "b"}).exit_code == 0
    assert runner.invoke(command, ["--no-verbose"]).exit_code == 0
    assert seen == [Sample(2.5, True, "b"), Sample(None, False, "a")]
    assert runner.invoke(command, [], env={"SPOTBOX_RATE": "0.5"}).exit_code == 1  # ConfigError, not caught here
    with pytest.raises(ConfigError, match=r"^--rate: 0.5 is below 1$"):
        Sample(rate=0.5)
    with pytest.raises(ConfigError, match=r"^--mode: 'c' is not one of a, b$"):
        Sample(mode="c")
