"""The fleet registry: POST /robots, PATCH and DELETE /robots/{serial}, merged into GET /robots with filters."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp

from spotbox.settings import Settings
from spotbox.users import Users
from tests.conftest import Box, BoxFactory
from tests.helpers import known_user, payload


async def call(box: Box, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    """One JSON request; the status and the decoded answer (None for an empty one)."""
    async with box.http.request(method, f"{box.base_url}{path}", json=body, **kwargs) as resp:
        return resp.status, (await resp.json() if resp.content_length != 0 and resp.status != 204 else None)


async def test_register_change_list_and_remove(box: Box) -> None:
    """Test on both backends that a registered robot is listed before it publishes, merged once it does, filtered
    by site, tag and presence, changed by PATCH and removed by DELETE."""
    robot = {"serial_number": "REG-1", "name": "Forklift 1", "model": "FX", "site": "berlin", "tags": ["night"]}
    status, created = await call(box, "POST", "/robots", robot)
    assert status == 201
    assert created["registered"] is True
    assert (created["latest"], created["last_seen"], created["presence"]) == (None, None, "unknown")
    assert await call(box, "POST", "/robots", robot) == (
        409,
        {"error": "robot already registered", "detail": {"serial_number": "REG-1"}},
    )
    await call(box, "POST", "/robots", {"serial_number": "REG-2", "site": "paris"})
    async with box.http.post(f"{box.base_url}/robots/SEEN-1/status", data=payload()) as resp:
        assert resp.status == 202
    _, fleet = await call(box, "GET", "/robots")
    assert [(i["serial_number"], i["registered"]) for i in fleet["items"]] == [
        ("REG-1", True),
        ("REG-2", True),
        ("SEEN-1", False),
    ]
    assert [i["serial_number"] for i in (await call(box, "GET", "/robots?site=berlin"))[1]["items"]] == ["REG-1"]
    assert [i["serial_number"] for i in (await call(box, "GET", "/robots?tag=night"))[1]["items"]] == ["REG-1"]
    assert [i["serial_number"] for i in (await call(box, "GET", "/robots?presence=online"))[1]["items"]] == ["SEEN-1"]
    assert (await call(box, "GET", "/robots?presence=asleep"))[0] == 400

    status, changed = await call(box, "PATCH", "/robots/REG-1", {"site": "hamburg", "tags": ["day", "day"]})
    assert status == 200
    assert (changed["site"], changed["tags"], changed["name"]) == ("hamburg", ["day"], "Forklift 1")
    assert (await call(box, "PATCH", "/robots/NOPE", {"site": "x"}))[0] == 404
    assert (await call(box, "DELETE", "/robots/REG-2"))[0] == 204
    assert (await call(box, "DELETE", "/robots/REG-2"))[0] == 404
    assert (await call(box, "GET", "/robots/REG-2"))[0] == 404
    _, one = await call(box, "GET", "/robots/REG-1")
    assert one["site"] == "hamburg"


async def test_registry_survives_a_restart(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that registered robots are stored: a restarted spotbox lists them."""
    settings = Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'r.db'}", batch_wait_ms=1.0)
    first = await make_box(settings)
    assert (await call(first, "POST", "/robots", {"serial_number": "KEEP", "tags": ["a"]}))[0] == 201
    await first.http.close()
    await first.server.close()
    second = await make_box(settings)
    _, robot = await call(second, "GET", "/robots/KEEP")
    assert (robot["registered"], robot["tags"]) == (True, ["a"])


async def test_bad_registrations_are_400(box: Box) -> None:
    """Test that a body that is not a robot is refused with a message naming the problem."""
    cases: list[tuple[Any, str]] = [
        ({"serial_number": "bad serial"}, "serial_number must be a robot serial number"),
        ({"serial_number": "OK", "colour": "red"}, "unknown field(s): colour"),
        ({"serial_number": "OK", "tags": "a"}, "tags must be a list"),
        ({"serial_number": "OK", "name": 5}, "name must be a string"),
        ([1], "body must be a JSON object"),
    ]
    for body, error in cases:
        status, answer = await call(box, "POST", "/robots", body)
        assert status == 400, body
        assert answer["error"].startswith(error), answer
    async with box.http.post(f"{box.base_url}/robots", data=b"{nope") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "body is not JSON"


async def test_managing_needs_a_login_with_the_manage_grant(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that with --users, POST/PATCH/DELETE /robots need a login (401) of a user with manage (403)."""
    users = Users(tmp_path / "users.json").with_user(known_user("ROBOT-1", "pw-robot"))
    users = users.with_user(known_user("viewer", "pw-viewer", subscribe=["robot/#"]))
    users.with_user(known_user("admin", "pw-admin", subscribe=["robot/#"], manage=True)).save()
    assert Users.load(tmp_path / "users.json").by_name["admin"].manage is True
    settings = Settings(
        http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / 'm.db'}", users_path=tmp_path / "users.json"
    )
    box = await make_box(dataclasses.replace(settings, batch_wait_ms=1.0))
    robot = {"serial_number": "M-1"}
    assert (await call(box, "POST", "/robots", robot))[0] == 401
    # A robot does not even read the fleet; a viewer reads it but may not change it.
    as_robot = {"Authorization": aiohttp.encode_basic_auth("ROBOT-1", "pw-robot")}
    assert (await call(box, "POST", "/robots", robot, headers=as_robot))[0] == 403
    as_viewer = {"Authorization": aiohttp.encode_basic_auth("viewer", "pw-viewer")}
    status, answer = await call(box, "POST", "/robots", robot, headers=as_viewer)
    assert (status, answer["error"]) == (403, "this user may not manage the fleet")
    as_admin = {"Authorization": aiohttp.encode_basic_auth("admin", "pw-admin")}
    assert (await call(box, "POST", "/robots", robot, headers=as_admin))[0] == 201
    assert (await call(box, "PATCH", "/robots/M-1", {"site": "x"}, headers=as_viewer))[0] == 403
    assert (await call(box, "DELETE", "/robots/M-1", headers=as_admin))[0] == 204
