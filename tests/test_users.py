"""`spotbox users` and the users file: hashed passwords, grants, and the checks on load."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from spotbox.cli import main
from spotbox.errors import ConfigError
from spotbox.users import Users, filter_covers, locked
from tests.conftest import SPOTBOX


def users_cmd(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, ["users", *args], input=stdin)


def add_user(path: Path, name: str, password: str, *grants: str) -> None:
    """`spotbox users add`, which must succeed."""
    result = users_cmd("add", name, "--file", str(path), "--password", password, *grants)
    assert result.exit_code == 0, result.output


def test_add_stores_an_argon2_hash_in_a_private_file(tmp_path: Path) -> None:
    """Test that the file holds an argon2id hash, never the password, and is readable by its owner only."""
    path = tmp_path / "users.json"
    add_user(path, "ROBOT-001", "s3cret-pass")
    text = path.read_text()
    assert "s3cret-pass" not in text
    entry = orjson.loads(text)["users"]["ROBOT-001"]
    assert entry["password"].startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".users.json.lock", "users.json"], "a temporary file was left behind"
    users = Users.load(path)
    assert users.authenticate("ROBOT-001", "s3cret-pass") is not None
    assert users.authenticate("ROBOT-001", "wrong") is None
    assert users.authenticate("NOBODY", "s3cret-pass") is None


def test_add_asks_for_the_password_twice(tmp_path: Path) -> None:
    """Test that without --password the password is prompted for, with a confirmation that must match."""
    path = tmp_path / "users.json"
    result = users_cmd("add", "ROBOT-002", "--file", str(path), stdin="one\ntwo\npw-1\npw-1\n")
    assert result.exit_code == 0, result.output
    assert "do not match" in result.output
    users = Users.load(path)
    assert users.authenticate("ROBOT-002", "pw-1") is not None
    assert users.authenticate("ROBOT-002", "one") is None


def test_add_again_changes_the_password_and_keeps_grants(tmp_path: Path) -> None:
    """Test that re-adding a user replaces its password and keeps its grants when none are given."""
    path = tmp_path / "users.json"
    add_user(path, "operator", "old", "--subscribe", "robot/#", "--publish", "robot/+/cmd")
    add_user(path, "operator", "new")
    user = Users.load(path).authenticate("operator", "new")
    assert user is not None
    assert user.subscribe == ("robot/#",)
    assert user.publish == ("robot/+/cmd",)
    assert Users.load(path).authenticate("operator", "old") is None


def test_manage_grant_is_given_kept_and_taken(tmp_path: Path) -> None:
    """Test that --manage gives the registry grant, re-adding keeps it, --no-manage takes it, a bad value is refused."""
    path = tmp_path / "users.json"
    add_user(path, "admin", "pw", "--manage")
    assert orjson.loads(path.read_text())["users"]["admin"]["manage"] is True
    add_user(path, "admin", "pw2")
    assert Users.load(path).by_name["admin"].manage is True
    add_user(path, "admin", "pw3", "--no-manage")
    assert Users.load(path).by_name["admin"].manage is False
    entry = orjson.loads(path.read_text())
    entry["users"]["admin"]["manage"] = "yes"
    path.write_bytes(orjson.dumps(entry))
    with pytest.raises(ConfigError, match="manage must be true or false"):
        Users.load(path)


def test_remove(tmp_path: Path) -> None:
    """Test that remove drops the user and that removing an unknown user is a one-line error."""
    path = tmp_path / "users.json"
    add_user(path, "ROBOT-001", "a")
    add_user(path, "ROBOT-002", "b")
    assert users_cmd("remove", "ROBOT-001", "--file", str(path)).exit_code == 0
    assert list(Users.load(path).by_name) == ["ROBOT-002"]
    result = users_cmd("remove", "ROBOT-001", "--file", str(path))
    assert result.exit_code == 1
    assert "no user 'ROBOT-001'" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["robot/ALPHA", "--password", "x"], "does not match"),
        ([".", "--password", "x"], "is not . or .."),
        (["..", "--password", "x"], "is not . or .."),
        (["ALPHA", "--password", ""], "must not be empty"),
        (["ALPHA", "--password", "x", "--subscribe", "robot/#/status"], "'#' must be a whole level, and the last"),
        (["ALPHA", "--password", "x", "--publish", "robot/a+"], "'+' must be a whole level"),
    ],
)
def test_add_refuses_bad_input(tmp_path: Path, args: list[str], expected: str) -> None:
    """Test that a bad user name, an empty password or a malformed grant is refused and nothing is written."""
    path = tmp_path / "users.json"
    result = users_cmd("add", *args[:1], "--file", str(path), *args[1:])
    assert result.exit_code == 1
    assert expected in result.output
    assert not path.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json", "not JSON"),
        (b'{"users": {}}', "not a spotbox users file"),
        (b'{"version": 1, "users": {"ROBOT-001": {"password": "plain"}}}', "not an argon2 hash"),
        (b'{"version": 1, "users": {"a/b": {"password": "$argon2id$"}}}', "does not match"),
        (b'{"version": 1, "users": {"A": {"password": "$argon2id$", "subscribe": "#"}}}', "must be a list"),
    ],
)
def test_load_refuses_a_bad_file(tmp_path: Path, content: bytes, expected: str) -> None:
    """Test that a users file that is not what spotbox writes is refused with a reason naming the option."""
    path = tmp_path / "users.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected) as info:
        Users.load(path)
    assert str(info.value).startswith("--users: ")


def test_list_shows_grants(tmp_path: Path) -> None:
    """Test that list shows each user's own topics and its extra grants."""
    path = tmp_path / "users.json"
    add_user(path, "operator", "pw", "--subscribe", "robot/#")
    result = users_cmd("list", "--file", str(path))
    assert result.exit_code == 0
    assert "operator\tpublish: robot/operator/status\tsubscribe: robot/operator/#, robot/#" in result.output


@pytest.mark.parametrize(
    ("granted", "requested", "covered"),
    [
        ("robot/A/#", "robot/A/status", True),
        ("robot/A/#", "robot/A", True),
        ("robot/A/#", "robot/A/#", True),
        ("robot/A/#", "robot/B/status", False),
        ("robot/A/#", "robot/+/status", False),
        ("robot/A/#", "robot/#", False),
        ("robot/+/status", "robot/A/status", True),
        ("robot/+/status", "robot/+/status", True),
        ("robot/+/status", "robot/#", False),
        ("robot/+/status", "robot/A/status/x", False),
        ("robot/A/status", "robot/A/status", True),
        ("robot/A/status", "robot/A/statu", False),
        ("#", "anything/at/all", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
    ],
)
def test_filter_covers(granted: str, requested: str, covered: bool) -> None:
    """Test that a grant covers exactly the topics and filters MQTT matching says it does."""
    assert filter_covers(granted, requested) is covered


# `spotbox users` in a process of its own, loading only the users command (a tenth of the whole CLI's start-up).
USERS_COMMAND = "import sys; from spotbox.users_cli import users; users(sys.argv[1:], prog_name='spotbox users')"


async def _users_subprocess(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", USERS_COMMAND, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return proc.returncode


def _crowded_file(path: Path) -> list[str]:
    """A users file of 3,000 users: loading and saving it takes long enough for unlocked runs to overlap."""
    some_hash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g"
    names = [f"FLEET-{n:05d}" for n in range(3_000)]
    users = {name: {"password": some_hash, "publish": [], "subscribe": []} for name in names}
    path.write_bytes(orjson.dumps({"version": 1, "users": users}))
    return names


async def test_concurrent_adds_lose_no_user(tmp_path: Path) -> None:
    """Test that eight `spotbox users add` run at once leave eight users (each loads, changes, saves under a lock)."""
    path = tmp_path / "users.json"
    fleet = _crowded_file(path)
    names = [f"ROBOT-{n}" for n in range(8)]
    async with asyncio.timeout(60):
        await asyncio.gather(
            *(_users_subprocess("add", name, "--file", str(path), "--password", "pw") for name in names)
        )
    assert sorted(Users.load(path).by_name) == sorted(fleet + names)


async def test_add_racing_a_remove_does_not_bring_the_user_back(tmp_path: Path) -> None:
    """Test that a removal run while another user is added stays removed, whichever runs first."""
    path = tmp_path / "users.json"
    fleet = _crowded_file(path)
    add_user(path, "REVOKED", "pw")
    async with asyncio.timeout(60):
        await asyncio.gather(
            _users_subprocess("remove", "REVOKED", "--file", str(path)),
            *(_users_subprocess("add", f"NEW-{n}", "--file", str(path), "--password", "pw") for n in range(2)),
        )
    assert sorted(Users.load(path).by_name) == sorted([*fleet, "NEW-0", "NEW-1"])


def test_a_held_lock_makes_a_change_wait(tmp_path: Path) -> None:
    """Test that `spotbox users add` waits while another holds the users file's lock, then applies its change."""
    path = tmp_path / "users.json"
    add_user(path, "FIRST", "pw")
    with locked(path):
        proc = subprocess.Popen([SPOTBOX, "users", "add", "SECOND", "--file", str(path), "--password", "pw"])
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.5)
        assert "SECOND" not in Users.load(path).by_name
    assert proc.wait(timeout=30) == 0
    assert sorted(Users.load(path).by_name) == ["FIRST", "SECOND"]
