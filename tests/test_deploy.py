"""The deployment recipes (Dockerfile, compose example, systemd unit) and the README's Docker commands.

No Docker engine or systemd runs here, so each recipe is checked the way it would run: its files build a wheel
that carries the dashboard, and its commands run against the local `spotbox` with its volume mapped to tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from spotbox.settings import DatabaseURL, Settings
from tests.conftest import SPOTBOX
from tests.test_cli import spotbox_process

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
IMAGE = "spotbox"  # the tag of `docker build -t spotbox .`


@dataclass
class Dockerfile:
    """The instructions of a Dockerfile, continuation lines joined."""

    instructions: list[tuple[str, str]]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        lines = [line.strip() for line in text.splitlines()]
        parts = [line.partition(" ") for line in lines if line and not line.startswith("#")]
        return cls([(name, rest.strip()) for name, _, rest in parts])

    def values(self, name: str) -> list[str]:
        return [rest for instruction, rest in self.instructions if instruction == name]

    def exec_form(self, name: str) -> list[str]:
        """The JSON (exec) form of the last ENTRYPOINT, CMD or HEALTHCHECK ... CMD."""
        rest = self.values(name)[-1]
        command: list[str] = json.loads(rest[rest.index("[") :])
        return command

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for rest in self.values("ENV") for item in shlex.split(rest))


@dataclass
class ImageRun:
    """One `docker run IMAGE ARGS` (or `docker compose run SERVICE ARGS`) of the README, taken apart."""

    args: list[str]
    volumes: dict[str, str] = field(default_factory=dict)  # container path -> source
    ports: list[int] = field(default_factory=list)  # container ports published
    env: dict[str, str] = field(default_factory=dict)


def parse_run(command: str, image: str) -> ImageRun:
    """Take a `docker [compose -f F] run` command apart; an option the test does not know fails it."""
    words = shlex.split(command)
    words = words[words.index("run") + 1 :]
    run = ImageRun([])
    while words:
        word = words.pop(0)
        if word in ("--rm", "-d", "--no-deps"):
            continue
        if word in ("--name", "-p", "-v", "-e"):
            value = words.pop(0)
            if word == "-p":
                run.ports.append(int(value.rsplit(":", 1)[1]))
            elif word == "-v":
                source, target = value.split(":")
                run.volumes[target] = source
            elif word == "-e":
                key, val = value.split("=", 1)
                run.env[key] = val
            continue
        assert not word.startswith("-"), f"unknown docker run option {word} in {command!r}"
        assert word == image, command
        run.args = words
        return run
    raise AssertionError(f"no image in {command!r}")


def readme_docker_commands() -> list[str]:
    """The shell commands of the README's Docker section, in order."""
    section = ROOT.joinpath("README.md").read_text().split("\n## Docker\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def relocated(values: list[str], paths: dict[str, Path]) -> list[str]:
    """Arguments with each deployment path (a volume, /etc/spotbox, ...) replaced by a local directory."""
    for deployed, local in paths.items():
        values = [value.replace(deployed, str(local)) for value in values]
    return values


def test_dockerfile_keeps_data_and_users_on_its_volume() -> None:
    """Test that the image's database and users file live on its volume, its ports are spotbox's, its user no root."""
    docker = Dockerfile.read(ROOT / "Dockerfile")
    assert docker.values("FROM") == ["python:3.11-slim"]
    (volume,) = docker.values("VOLUME")
    user = docker.values("USER")[-1]
    assert user not in ("root", "0")
    assert any(f"useradd --system --uid 10001 --home-dir {volume}" in run for run in docker.values("RUN"))
    defaults = Settings()
    assert docker.values("EXPOSE") == [f"{defaults.http_port} {defaults.mqtt_port}"]
    # DATABASE_URL, not SPOTBOX_DATABASE_URL: the latter wins in spotbox, and would shadow `-e DATABASE_URL=...`.
    assert "SPOTBOX_DATABASE_URL" not in docker.env
    database = DatabaseURL.parse(docker.env["DATABASE_URL"])
    assert database.sqlite_path is not None
    assert database.sqlite_path.parent == Path(volume)
    assert docker.exec_form("ENTRYPOINT") == ["spotbox"]
    command = docker.exec_form("CMD")
    assert command[0] == "run"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert options["--http-host"] == options["--mqtt-host"] == "0.0.0.0"
    assert Path(options["--users"]).parent == Path(volume)
    health = docker.exec_form("HEALTHCHECK")
    assert health[0] == "python"
    assert "/health" in health[-1]


@pytest.mark.slow  # a real isolated build: pip fetches the build backend into a fresh environment
@pytest.mark.timeout(180)
def test_dockerfile_copies_what_builds_a_wheel_with_the_dashboard(tmp_path: Path) -> None:
    """Test that the files the Dockerfile COPYs build a wheel holding the dashboard, the schema and py.typed."""
    docker = Dockerfile.read(ROOT / "Dockerfile")
    context = tmp_path / "context"
    context.mkdir()
    for copy in docker.values("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                # As the build context would: symlinks kept, caches left out (.dockerignore).
                shutil.copytree(
                    origin, context / source, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                shutil.copy(origin, context / source)
    wheels = tmp_path / "wheels"
    # The same build `pip install .` runs in the image (isolated build environment, no dependencies needed).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(context)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("spotbox-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {name for name in names if name.startswith("spotbox/static/")}
    shipped = {f"spotbox/static/{path.name}" for path in (ROOT / "spotbox" / "static").iterdir()}
    assert packaged == shipped
    assert {"spotbox/static/index.html", "spotbox/schemas/robot-status.schema.json", "spotbox/py.typed"} <= names


async def run_to_end(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    """Run a command to completion; its exit status and its output."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_readme_docker_commands_run_as_the_image_runs_them(tmp_path: Path) -> None:
    """Test each README Docker command as the image runs it: users in the volume, spotbox up, HEALTHCHECK passes."""
    docker = Dockerfile.read(ROOT / "Dockerfile")
    (volume,) = docker.values("VOLUME")
    entrypoint, command = docker.exec_form("ENTRYPOINT"), docker.exec_form("CMD")
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    data = tmp_path / "data"
    data.mkdir()
    health = [sys.executable if part == "python" else part for part in docker.exec_form("HEALTHCHECK")]
    commands = readme_docker_commands()
    assert commands[0] == f"docker build -t {IMAGE} ."
    started = 0
    for line in commands:
        if line.startswith("docker run"):
            run = parse_run(line, IMAGE)
            assert set(run.volumes) <= {volume}, line
            assert set(run.ports) <= {int(port) for port in docker.values("EXPOSE")[0].split()}, line
        elif line.startswith("docker compose") and " run " in line:
            assert line.startswith("docker compose -f examples/docker-compose.yml "), line
            run = parse_run(line, "spotbox")
            service = compose["services"]["spotbox"]
            run.volumes = {item.split(":")[1]: item.split(":")[0] for item in service["volumes"]}
            run.env = dict(service["environment"])
        else:
            continue
        image_env = {**docker.env, **run.env}
        image_env = dict(zip(image_env, relocated(list(image_env.values()), {volume: data}), strict=True))
        # Only the image's settings count: none of the developer's own spotbox variables.
        env = {key: value for key, value in os.environ.items() if not key.startswith("SPOTBOX_")}
        env.update(image_env, SPOTBOX_HTTP_PORT="0", SPOTBOX_MQTT_PORT="0")
        database = DatabaseURL.parse(env["DATABASE_URL"])
        if run.args:
            assert entrypoint == [Path(SPOTBOX).name]
            code, out = await run_to_end(SPOTBOX, *relocated(run.args, {volume: data}), env=env)
            assert code == 0, f"{line}\n{out}"
        elif database.scheme == "postgresql":
            continue  # the README's example server is not reachable here; the SQLite run proves the command
        else:
            async with spotbox_process(*relocated(command[1:], {volume: data}), env=env) as box:
                code, out = await run_to_end(*health, env={**env, "SPOTBOX_HTTP_PORT": str(box.http_port)})
                assert code == 0, f"HEALTHCHECK failed: {out}"
            assert database.sqlite_path is not None
            assert database.sqlite_path.is_file()
            started += 1
            # Stopped, the same check reports unhealthy: it can fail.
            code, _ = await run_to_end(*health, env={**env, "SPOTBOX_HTTP_PORT": str(box.http_port)})
            assert code != 0
    assert started == 1
    assert (data / "users").is_file()


def test_compose_example_wires_spotbox_to_its_postgres() -> None:
    """Test that the compose example builds this Dockerfile and points DATABASE_URL at its own PostgreSQL service."""
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    spotbox, postgres = services["spotbox"], services["postgres"]
    assert (EXAMPLES / spotbox["build"]["context"] / "Dockerfile").resolve() == ROOT / "Dockerfile"

    def defaults(value: str) -> str:
        """What compose substitutes for ${NAME:-default} when NAME is unset."""
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)

    url = DatabaseURL.parse(defaults(spotbox["environment"]["DATABASE_URL"]))
    assert url.scheme == "postgresql"
    parts = re.match(r"postgresql://([^:]+):([^@]+)@([^:/]+):(\d+)/(\w+)$", url.url)
    assert parts is not None
    pg_env = {key: defaults(value) for key, value in postgres["environment"].items()}
    assert parts.groups() == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        "postgres",
        "5432",
        pg_env["POSTGRES_DB"],
    )
    assert spotbox["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    docker = Dockerfile.read(ROOT / "Dockerfile")
    (volume,) = docker.values("VOLUME")
    assert [item.split(":")[1] for item in spotbox["volumes"]] == [volume]
    exposed = {int(port) for port in docker.values("EXPOSE")[0].split()}
    assert {int(mapping.split(":")[1]) for mapping in spotbox["ports"]} == exposed


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section -> key -> every value given (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


UNIT = EXAMPLES / "spotbox.service"
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
}


def test_systemd_unit_is_hardened_and_waits_for_spotbox_to_drain(tmp_path: Path) -> None:
    """Test the unit's required keys, its hardening, and with systemd-analyze (when present) verify and security."""
    unit = read_unit(UNIT)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert {key: service.get(key) for key in HARDENING} == HARDENING
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert service["User"] not in ("", "root", "0")
    assert service["Restart"] == "on-failure"
    # systemd must not SIGKILL spotbox while it still commits what it acknowledged.
    assert float(service["TimeoutStopSec"]) > Settings().shutdown_timeout_s
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/bin/spotbox")
    assert command[1] == "run"
    env = dict(item.split("=", 1) for item in unit["Service"]["Environment"])
    database = DatabaseURL.parse(env["SPOTBOX_DATABASE_URL"])
    assert database.sqlite_path is not None
    assert database.sqlite_path.parent == Path("/var/lib") / service["StateDirectory"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the keys above are what can be checked without systemd's own tools
    local = tmp_path / UNIT.name
    local.write_text(UNIT.read_text().replace(command[0], SPOTBOX))  # verify wants an executable there
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr == ""
    # Exposure is 0 (locked down) to 10 (unprotected); 2.0 and below is what systemd calls "OK".
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", str(local)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:]


async def test_systemd_unit_command_runs(tmp_path: Path) -> None:
    """Test the unit's install steps and ExecStart as they are, with /etc/spotbox and /var/lib/spotbox in tmp_path."""
    unit = read_unit(UNIT)
    command = shlex.split(unit["Service"]["ExecStart"][-1])
    binary = command[0]
    paths = {binary: Path(SPOTBOX), "/etc/spotbox": tmp_path / "etc", "/var/lib/spotbox": tmp_path / "state"}
    for local in (tmp_path / "etc", tmp_path / "state"):
        local.mkdir()
    install = [line.lstrip("# ").strip() for line in UNIT.read_text().splitlines() if f"{binary} users add" in line]
    assert len(install) == 1
    code, out = await run_to_end(*relocated(shlex.split(install[0]), paths), env=dict(os.environ))
    assert code == 0, out
    env = dict(item.split("=", 1) for item in unit["Service"]["Environment"])
    env = dict(zip(env, relocated(list(env.values()), paths), strict=True))
    async with (
        spotbox_process(
            *relocated(command[2:], paths), env={**env, "SPOTBOX_HTTP_PORT": "0", "SPOTBOX_MQTT_PORT": "0"}
        ) as box,
        aiohttp.ClientSession() as http,
        # With its users file the console asks a browser to log in first.
        http.get(f"http://127.0.0.1:{box.http_port}/", headers={"Accept": "text/html"}) as resp,
    ):
        assert resp.status == 200
        assert resp.url.path == "/login"
        assert "spotbox" in await resp.text()
    assert (tmp_path / "state" / "spotbox.db").is_file()
