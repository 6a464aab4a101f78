"""POST /robots/{serial}/status with --users: HTTP Basic login and the same publish grants as MQTT."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from spotbox.settings import Settings
from spotbox.users import Users
from tests.conftest import Box, BoxFactory
from tests.helpers import known_user, mqtt_client, payload
from tests.test_auth import secured_settings

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)

PASSWORDS = {"ROBOT-A": "pw-a", "ROBOT-B": "pw-b", "fleet": "pw-fleet", "commander": "pw-cmd", "watcher": "pw-w"}
CHALLENGE = 'Basic realm="spotbox"'


def write_users(path: Path) -> Path:
    """Two robots, `fleet` granted every robot's status, `commander` granted only robot/+/cmd, `watcher` reads all."""
    users = Users(path)
    for name in ("ROBOT-A", "ROBOT-B"):
        users = users.with_user(known_user(name, PASSWORDS[name]))
    users = users.with_user(known_user("fleet", PASSWORDS["fleet"], publish=["robot/+/status"]))
    users = users.with_user(known_user("watcher", PASSWORDS["watcher"], subscribe=["robot/#"]))
    users.with_user(known_user("commander", PASSWORDS["commander"], publish=["robot/+/cmd"])).save()
    return path


@pytest.fixture
async def secured(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox with a users file (SQLite: access control does not depend on the database)."""
    settings = secured_settings(tmp_path)
    box = await make_box(dataclasses.replace(settings, users_path=write_users(tmp_path / "http-users.json")))
    box.read_headers = login("watcher")
    return box


def login(name: str, password: str | None = None) -> dict[str, str]:
    """HTTP Basic credentials (headers) of a user of the file, with its own password unless told otherwise."""
    secret = PASSWORDS.get(name, "pw") if password is None else password
    return {"Authorization": aiohttp.encode_basic_auth(name, secret)}


async def post(box: Box, serial: str, **kwargs: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST a valid status for `serial`; code, JSON answer, response."""
    async with box.http.post(f"{box.base_url}/robots/{serial}/status", data=payload(), **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json(), resp


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "authentication required"),
        ({"headers": login("ROBOT-A", "wrong")}, "bad username or password"),
        ({"headers": login("ROBOT-Z")}, "bad username or password"),
        ({"headers": login("ROBOT-A", "")}, "bad username or password"),
        ({"headers": {"Authorization": "Basic not-base64!"}}, "authentication required"),
        ({"headers": {"Authorization": "Bearer pw-a"}}, "authentication required"),
    ],
    ids=["no-credentials", "wrong-password", "unknown-user", "empty-password", "malformed", "not-basic"],
)
async def test_post_without_a_valid_login_is_401(secured: Box, kwargs: dict[str, Any], error: str) -> None:
    """Test that without a user's right credentials a status is refused with 401 and a Basic challenge, unstored."""
    code, body, resp = await post(secured, "ROBOT-A", **kwargs)
    assert (code, body) == (401, {"error": error, "detail": None})
    assert resp.headers["WWW-Authenticate"] == CHALLENGE
    assert secured.pipeline.stats.received == 0
    assert await secured.history("ROBOT-A") == []


async def test_robot_posts_its_own_status(secured: Box) -> None:
    """Test that a robot with its password posts its own status: 202, and the row is stored."""
    code, body, _ = await post(secured, "ROBOT-A", headers=login("ROBOT-A"))
    assert code == 202
    assert [item["id"] for item in await secured.history("ROBOT-A")] == [body["id"]]


async def test_robot_cannot_post_another_robots_status(secured: Box) -> None:
    """Test that a logged-in robot posting for another robot gets 403 naming the topic, and nothing is stored."""
    code, body, resp = await post(secured, "ROBOT-B", headers=login("ROBOT-A"))
    assert code == 403
    assert body == {"error": "not authorized for this robot", "detail": {"topic": "robot/ROBOT-B/status"}}
    assert "WWW-Authenticate" not in resp.headers
    assert secured.pipeline.stats.received == 0
    assert await secured.history("ROBOT-B") == []


async def test_grants_decide_which_robots_a_user_may_post_for(secured: Box) -> None:
    """Test that `robot/+/status` lets a user post for any robot, while a grant of robot/+/cmd does not."""
    assert (await post(secured, "ROBOT-A", headers=login("fleet")))[0] == 202
    assert (await post(secured, "ROBOT-NEW", headers=login("fleet")))[0] == 202
    code, body, _ = await post(secured, "ROBOT-B", headers=login("commander"))
    assert (code, body["detail"]) == (403, {"topic": "robot/ROBOT-B/status"})
    assert len(await secured.history("ROBOT-A")) == 1
    assert len(await secured.history("ROBOT-NEW")) == 1
    assert await secured.history("ROBOT-B") == []


async def test_open_reads_leave_reads_open_with_users(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that with --users and --open-reads the read routes answer without credentials (only ingest is guarded)."""
    settings = dataclasses.replace(secured_settings(tmp_path), open_reads=True)
    box = await make_box(dataclasses.replace(settings, users_path=write_users(tmp_path / "http-users.json")))
    async with mqtt_client(box.mqtt_port, username="ROBOT-A", password=PASSWORDS["ROBOT-A"]) as robot:
        await robot.publish("robot/ROBOT-A/status", payload(), qos=1)
    async with box.http.get(f"{box.base_url}/robots/ROBOT-A") as resp:
        assert resp.status == 200
    assert len(await box.history("ROBOT-A")) == 1
    assert (await post(box, "ROBOT-A"))[0] == 401


async def test_without_users_post_needs_no_credentials(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that in the local-only mode (no --users) a status is accepted without credentials, as before."""
    box = await make_box(Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'spotbox.db'}"))
    code, _, resp = await post(box, "ROBOT-A")
    assert code == 202
    assert "WWW-Authenticate" not in resp.headers
    assert len(await box.history("ROBOT-A")) == 1
