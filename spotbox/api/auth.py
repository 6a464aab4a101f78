"""Logins for the read routes when spotbox runs with --users: HTTP Basic for API clients, a session cookie for browsers.

Every route needs a login except those listed in OPEN_ROUTES (health, metrics, the API description, the login form,
MQTT over WebSocket, which logs in over MQTT) and HTTP ingest (which checks its own publish grant). A route about
one robot (`/robots/{serial}...`) needs a user who may subscribe to `robot/{serial}/status` over MQTT; any other
route (the fleet, `/feed`, `/stats`, the console, and routes added later) needs one who may subscribe to
`robot/+/status`: the grants of the users file are the read grants, so one file says who sees what, over MQTT and
HTTP alike. New routes are covered by default: forgetting to protect one is not possible.
"""

from __future__ import annotations

import hashlib
import html
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import quote

from aiohttp import hdrs, web

from spotbox.api.body import reading
from spotbox.api.errors import BASIC_CHALLENGE, Handler, error_response
from spotbox.api.ingest import basic_credentials, check_password
from spotbox.keys import RUNTIME, SETTINGS
from spotbox.users import User, Users

logger = logging.getLogger(__name__)

COOKIE = "spotbox_session"
SESSION_TTL_S = 12 * 3600
SESSIONS_MAX = 10_000
# A verified Basic login is remembered this long (by a digest of its header), so an API client polling history does
# not pay an argon2 check (about 20 ms of CPU by design) per request.
BASIC_CACHE_TTL_S = 60.0
BASIC_CACHE_MAX = 1024
OPEN_ROUTES = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/login", "/logout", "/mqtt"})
FLEET_TOPIC = "robot/+/status"
USER_KEY = web.RequestKey("user", User)


@dataclass
class Logins:
    """Browser sessions and recently verified Basic logins, in memory: a restart asks browsers to log in again."""

    sessions: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)
    basic: OrderedDict[bytes, tuple[str, float]] = field(default_factory=OrderedDict)

    def open_session(self, name: str) -> str:
        """A new random session token for user `name`; the oldest session goes past SESSIONS_MAX."""
        token = secrets.token_urlsafe(32)
        self.sessions[token] = (name, time.monotonic() + SESSION_TTL_S)
        if len(self.sessions) > SESSIONS_MAX:
            self.sessions.popitem(last=False)
        return token

    def session_user(self, token: str) -> str | None:
        """The user name of a live session, or None."""
        entry = self.sessions.get(token)
        if entry is None or entry[1] < time.monotonic():
            self.sessions.pop(token, None)
            return None
        return entry[0]

    def close_session(self, token: str) -> None:
        """Forget a session (logout)."""
        self.sessions.pop(token, None)

    def cached_basic(self, header: str) -> str | None:
        """The user name of a Basic header verified in the last BASIC_CACHE_TTL_S seconds, or None."""
        entry = self.basic.get(_digest(header))
        return entry[0] if entry is not None and entry[1] >= time.monotonic() else None

    def remember_basic(self, header: str, name: str) -> None:
        """Remember a verified Basic header (its digest only, never the password)."""
        self.basic[_digest(header)] = (name, time.monotonic() + BASIC_CACHE_TTL_S)
        if len(self.basic) > BASIC_CACHE_MAX:
            self.basic.popitem(last=False)


LOGINS = web.AppKey("logins", Logins)


def _digest(header: str) -> bytes:
    return hashlib.blake2b(header.encode("utf-8", "surrogatepass"), digest_size=32).digest()


def read_auth_required(app: web.Application) -> bool:
    """True when the read routes need a login: a users file is given and --open-reads is not."""
    return app[RUNTIME].users is not None and not app[SETTINGS].open_reads


async def _reader(request: web.Request, users: Users) -> User | None:
    """The user of the request's session cookie or Basic credentials, or None."""
    logins = request.app[LOGINS]
    token = request.cookies.get(COOKIE)
    if token and (name := logins.session_user(token)) is not None:
        return users.by_name.get(name)
    header = request.headers.get(hdrs.AUTHORIZATION, "")
    if not header:
        return None
    if (name := logins.cached_basic(header)) is not None:
        return users.by_name.get(name)
    credentials = basic_credentials(header)
    if credentials is None:
        return None
    user = await check_password(request, users, *credentials)
    if user is None:
        logger.warning("http read refused: bad username or password for %r from %s", credentials[0], request.remote)
        return None
    logins.remember_basic(header, user.name)
    return user


def _wants_page(request: web.Request) -> bool:
    """True for a browser loading a page (not a script's fetch or an EventSource)."""
    return request.method == "GET" and "text/html" in request.headers.get(hdrs.ACCEPT, "")


def _is_open(request: web.Request) -> bool:
    """True when the request needs no read login: no users file, --open-reads, an open route, or HTTP ingest."""
    if not read_auth_required(request.app):
        return True
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else None
    if canonical is None or canonical in OPEN_ROUTES:
        return True  # unknown paths answer 404 either way
    # HTTP ingest checks its own login and publish grant.
    return request.method == "POST" and canonical == "/robots/{serial}/status"


@web.middleware
async def read_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a login, and the user's read grant, for every route but the open ones (with --users)."""
    if _is_open(request):
        return await handler(request)
    users = request.app[RUNTIME].users
    assert users is not None
    user = await _reader(request, users)
    if user is None:
        if _wants_page(request):
            return _see_other(f"/login?next={quote(request.path_qs, safe='')}")
        # A browser whose session ended gets no challenge: a Basic prompt would hide the login form.
        headers = None if COOKIE in request.cookies else {"WWW-Authenticate": BASIC_CHALLENGE}
        return error_response(401, "authentication required", None, headers)
    serial = request.match_info.get("serial")
    topic = f"robot/{serial}/status" if serial is not None else FLEET_TOPIC
    if not user.may_subscribe(topic):
        logger.warning("http read refused: user %r may not read %r", user.name, topic)
        return error_response(403, "not authorized to read this", {"topic": topic})
    request[USER_KEY] = user
    return await handler(request)


_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>spotbox: log in</title>
<style>body{{font:16px system-ui,sans-serif;max-width:22rem;margin:4rem auto;padding:0 1rem}}
label,input,button{{display:block;width:100%;margin:.3rem 0;box-sizing:border-box}}input,button{{padding:.5rem}}
.error{{color:#b00020}}</style></head>
<body><h1>spotbox</h1><p>Log in with a user of the users file.</p>{error}
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>User <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form></body></html>
"""


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={hdrs.LOCATION: location, "Cache-Control": "no-store"})


def _safe_next(target: str) -> str:
    """Where to go after logging in: a path of this site only (never `//other.host`), else the console.

    Printable ASCII without spaces only: browsers drop tabs and line breaks from a URL, so `/<TAB>/evil.com`
    would lead to `//evil.com`, and a line break cannot go into the Location header at all."""
    if (
        target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and target.isascii()
        and target.isprintable()
        and " " not in target
    ):
        return target
    return "/"


def _form(next_path: str, error: str = "") -> web.Response:
    shown = f'<p class="error">{html.escape(error)}</p>' if error else ""
    body = _FORM.format(error=shown, next=html.escape(_safe_next(next_path), quote=True))
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


async def login_form(request: web.Request) -> web.Response:
    """GET /login: the form a browser logs in with (saying so after a failed attempt)."""
    failed = "failed" in request.query
    return _form(request.query.get("next", "/"), "Wrong user name or password." if failed else "")


async def login(request: web.Request) -> web.Response:
    """POST /login: check the user's password; set an HttpOnly, SameSite=Strict session cookie and go on to `next`.

    A wrong password goes back to the form; either way the answer is a 303.
    """
    users = request.app[RUNTIME].users
    async with reading(request):
        form = await request.post()
    next_path = str(form.get("next", "/"))
    name, password = str(form.get("username", "")), str(form.get("password", ""))
    user = await check_password(request, users, name, password) if users is not None and name and password else None
    if user is None:
        logger.warning("http login refused: bad username or password for %r from %s", name, request.remote)
        # Post/redirect/get: a reload does not resend the password.
        return _see_other(f"/login?failed=1&next={quote(_safe_next(next_path), safe='')}")
    response = _see_other(_safe_next(next_path))
    response.set_cookie(
        COOKIE,
        request.app[LOGINS].open_session(user.name),
        max_age=SESSION_TTL_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    logger.info("http login: user %r from %s", user.name, request.remote)
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /logout: end the browser's session and return to the login form."""
    token = request.cookies.get(COOKIE)
    if token:
        request.app[LOGINS].close_session(token)
    response = _see_other("/login")
    response.del_cookie(COOKIE, path="/", samesite="Strict", secure=request.secure, httponly=True)
    return response


def add_routes(app: web.Application) -> None:
    """Register the login form and the session store (the middleware is added by the app factory)."""
    app[LOGINS] = Logins()
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
