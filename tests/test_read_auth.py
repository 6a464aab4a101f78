"""With --users the read routes need a login too: HTTP Basic for API clients, a session cookie for the console."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from spotbox.users import Users
from tests.conftest import Box, BoxFactory
from tests.helpers import known_user, open_feed, payload, stamp
from tests.test_auth import secured_settings

PASSWORDS = {"ROBOT-A": "pw-a", "ROBOT-B": "pw-b", "operator": "pw-op"}
READ_ROUTES = ["/robots", "/robots/ROBOT-A", "/robots/ROBOT-A/history", "/stats", "/feed", "/robots/ROBOT-A/feed"]
OPEN_ROUTES = ["/health", "/ready", "/metrics", "/openapi.json", "/docs", "/login"]


def basic(name: str, password: str | None = None) -> dict[str, str]:
    """HTTP Basic headers of a user of the file."""
    return {"Authorization": aiohttp.encode_basic_auth(name, password or PASSWORDS[name])}


@pytest.fixture
async def guarded(make_box: BoxFactory, tmp_path: Path) -> Box:
    """spotbox with users: two robots (each reads its own topics) and an operator granted robot/#."""
    users = Users(tmp_path / "read-users.json")
    for name in ("ROBOT-A", "ROBOT-B"):
        users = users.with_user(known_user(name, PASSWORDS[name]))
    users.with_user(known_user("operator", PASSWORDS["operator"], subscribe=["robot/#"])).save()
    box = await make_box(dataclasses.replace(secured_settings(tmp_path), users_path=users.path))
    async with box.http.post(f"{box.base_url}/robots/ROBOT-A/status", data=payload(), headers=basic("ROBOT-A")) as r:
        assert r.status == 202
    return box


async def _status(box: Box, path: str, headers: dict[str, str] | None = None) -> tuple[int, aiohttp.ClientResponse]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with box.http.get(f"{box.base_url}{path}", headers=headers, timeout=timeout, allow_redirects=False) as r:
        return r.status, r


@pytest.mark.parametrize("path", READ_ROUTES)
async def test_read_route_without_login_is_401(guarded: Box, path: str) -> None:
    """Test that each read route answers 401 in the error shape, with a Basic challenge, to a client without login."""
    async with guarded.http.get(f"{guarded.base_url}{path}") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="spotbox"'
        assert await resp.json() == {"error": "authentication required", "detail": None}


@pytest.mark.parametrize("path", READ_ROUTES)
async def test_wrong_password_is_401(guarded: Box, path: str) -> None:
    """Test that a wrong password reads nothing."""
    code, _ = await _status(guarded, path, basic("operator", "wrong"))
    assert code == 401


@pytest.mark.parametrize("path", OPEN_ROUTES)
async def test_health_metrics_and_docs_stay_open(guarded: Box, path: str) -> None:
    """Test that liveness, readiness, metrics, the API description and the login form need no login."""
    code, _ = await _status(guarded, path)
    assert code == 200


async def test_each_user_reads_what_it_may_subscribe_to(guarded: Box) -> None:
    """Test that a robot reads its own history and feed but not another's nor the fleet (403); robot/# reads all."""
    own = ["/robots/ROBOT-A", "/robots/ROBOT-A/history"]
    for path in own:
        assert (await _status(guarded, path, basic("ROBOT-A")))[0] == 200
    for path in ["/robots/ROBOT-B/history", "/robots", "/stats", "/"]:
        assert (await _status(guarded, path, basic("ROBOT-A")))[0] == 403, path
    for path in [*own, "/robots", "/stats", "/robots/ROBOT-B/history"]:
        assert (await _status(guarded, path, basic("operator")))[0] in (200, 404), path
    async with guarded.http.get(f"{guarded.base_url}/robots/ROBOT-B/history", headers=basic("ROBOT-A")) as resp:
        assert await resp.json() == {
            "error": "not authorized to read this",
            "detail": {"topic": "robot/ROBOT-B/status"},
        }


@pytest.fixture
async def browser(guarded: Box) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies like a browser (its cookie jar accepts the IP-address host)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def test_console_login_sets_a_strict_httponly_cookie(guarded: Box, browser: aiohttp.ClientSession) -> None:
    """Test the browser flow: the console sends to /login, the form sets an HttpOnly SameSite=Strict cookie (not
    Secure over plain HTTP), the cookie reads the fleet, and logging out ends it."""
    page = {"Accept": "text/html"}
    async with browser.get(f"{guarded.base_url}/", headers=page, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/login?next=%2F"
    async with browser.get(f"{guarded.base_url}/login?next=%2F") as resp:
        assert 'name="next" value="/"' in await resp.text()
    form = {"username": "operator", "password": PASSWORDS["operator"], "next": "/"}
    async with browser.post(f"{guarded.base_url}/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/"
        cookie = resp.cookies["spotbox_session"]
        assert (cookie["httponly"], cookie["samesite"], cookie["path"]) == (True, "Strict", "/")
        assert not cookie["secure"]
        token = cookie.value
    for path in ["/", "/robots", "/robots/ROBOT-A/history"]:
        async with browser.get(f"{guarded.base_url}{path}") as resp:
            assert resp.status == 200, path
    async with browser.post(f"{guarded.base_url}/logout", allow_redirects=False) as resp:
        assert resp.status == 303
    assert "spotbox_session" not in {cookie.key for cookie in browser.cookie_jar}
    async with browser.get(f"{guarded.base_url}/robots") as resp:
        assert resp.status == 401
    # The server forgot the session: the old cookie, sent again, reads nothing (and gets no Basic prompt).
    stale = {"Cookie": f"spotbox_session={token}"}
    async with guarded.http.get(f"{guarded.base_url}/robots", headers=stale) as resp:
        assert resp.status == 401
        assert "WWW-Authenticate" not in resp.headers


async def test_wrong_password_in_the_form_sets_no_cookie(guarded: Box, browser: aiohttp.ClientSession) -> None:
    """Test that a wrong password goes back to the form saying so, with no session."""
    form = {"username": "operator", "password": "nope", "next": "/"}
    async with browser.post(f"{guarded.base_url}/login", data=form) as resp:
        assert resp.status == 200
        assert "Wrong user name or password." in await resp.text()
    assert "spotbox_session" not in {cookie.key for cookie in browser.cookie_jar}
    async with browser.get(f"{guarded.base_url}/robots") as resp:
        assert resp.status == 401


@pytest.mark.parametrize(
    "target",
    # Browsers drop tabs and line breaks from a URL: "/\t/evil.example" leads to "//evil.example".
    [
        *("//evil.example/", "https://evil.example/", "/\\evil.example"),
        *("/\t/evil.example", "/\n/evil.example", "/\r\nX: y", "/ /evil.example"),
    ],
)
async def test_login_never_sends_elsewhere(guarded: Box, browser: aiohttp.ClientSession, target: str) -> None:
    """Test that `next` can only lead to a path of this site (no open redirect), from the form and the link alike."""
    form = {"username": "operator", "password": PASSWORDS["operator"], "next": target}
    async with browser.post(f"{guarded.base_url}/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/"
    async with browser.get(f"{guarded.base_url}/login", params={"next": target}) as resp:
        assert 'name="next" value="/"' in await resp.text()


async def test_feed_streams_with_the_session_cookie(guarded: Box, browser: aiohttp.ClientSession) -> None:
    """Test that a feed opened with the session cookie (as EventSource sends it) streams live statuses."""
    form = {"username": "operator", "password": PASSWORDS["operator"], "next": "/"}
    async with browser.post(f"{guarded.base_url}/login", data=form, allow_redirects=False) as resp:
        assert resp.status == 303
    async with open_feed(browser, f"{guarded.base_url}/robots/ROBOT-A/feed") as feed:
        body = payload(timestamp=stamp(7))
        url = f"{guarded.base_url}/robots/ROBOT-A/status"
        async with guarded.http.post(url, data=body, headers=basic("ROBOT-A")) as resp:
            assert resp.status == 202
        async with asyncio.timeout(10):
            event = await feed.next()
    assert event.json()["ts"] == stamp(7)


async def test_a_robot_reads_its_own_feed_with_basic(guarded: Box) -> None:
    """Test that HTTP Basic opens a robot's own feed, and another robot's feed is 403."""
    async with open_feed(guarded.http, f"{guarded.base_url}/robots/ROBOT-A/feed", headers=basic("ROBOT-A")):
        pass
    assert (await _status(guarded, "/robots/ROBOT-B/feed", basic("ROBOT-A")))[0] == 403
