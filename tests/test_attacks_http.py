"""Hostile HTTP requests (found by probing `spotbox run` from outside): each is a clear 4xx in the JSON error
shape and one log line, never a 500, a traceback or a connection held for ever."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from spotbox.app import create_app
from tests.conformance import settings_with
from tests.conftest import Box, BoxFactory
from tests.helpers import payload
from tests.test_auth import PASSWORDS, secured_settings

# Times past the years a datetime holds: the C library refuses them with EOVERFLOW (an OSError) before Python's
# own range check.
FAR = 99999999999999999999999


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def answer(box: Box, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with box.http.request(method, f"{box.base_url}{path}", **kwargs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def test_forged_cursors_are_400(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    """Test that cursors naming times far outside the years 1 to 9999, or alert ids no alert can have, are 400 on
    history and alerts, on both backends, with no traceback logged."""
    await box.storage.write_batch([])
    async with box.http.post(f"{box.base_url}/robots/R1/status", data=payload()) as resp:
        assert resp.status == 202
    for forged in (f"{FAR}:1", f"-{FAR}:1", "253402300800000000:1"):
        status, body = await answer(box, "GET", "/robots/R1/history", params={"cursor": cursor(forged)})
        assert (status, body["error"]) == (400, "cursor is not one this server issued")
    for forged in (f"{FAR}:x", "1:\x00", f"1:{'a' * 65}"):
        status, body = await answer(box, "GET", "/alerts", params={"cursor": cursor(forged)})
        assert (status, body["error"]) == (400, "cursor is not one this server issued")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_nul_in_the_registry_and_alert_ids_is_refused(box: Box) -> None:
    """Test that a NUL in a registry field or tag is a 400 and an alert id with one a 404, on both backends
    (PostgreSQL's text cannot hold it: these were 500s there), and that a registry body naming a field twice is a
    400 (orjson keeps the last one silently; a status with a repeated key is refused)."""
    for body in ({"serial_number": "REG-1", "name": "a\x00b"}, {"serial_number": "REG-1", "tags": ["x\x00"]}):
        status, answered = await answer(box, "POST", "/robots", json=body)
        assert status == 400, answered
        assert "no NUL" in answered["error"]
    status, answered = await answer(
        box, "POST", "/robots", data=b'{"serial_number": "REG-1", "name": "a", "name": "b"}'
    )
    assert (status, answered["error"]) == (400, "body: name: is a duplicate key (a JSON object names each key once)")
    status, _ = await answer(box, "POST", "/robots", json={"serial_number": "REG-1", "name": 'say ":"'})
    assert status == 201
    status, answered = await answer(box, "PATCH", "/robots/REG-1", json={"site": "\x00"})
    assert status == 400, answered
    for method, path in (("GET", "/alerts/%00"), ("POST", "/alerts/%00/ack")):
        status, answered = await answer(box, method, path)
        assert (status, answered["error"]) == (404, "no such alert")


async def test_a_body_that_cannot_be_decoded_is_400(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that a status body with a Content-Encoding it is not in (plain JSON labelled gzip) is a 400."""
    box = await make_box(settings_with(tmp_path))
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    status, body = await answer(box, "POST", "/robots/R1/status", data=payload(), headers=headers)
    assert status == 400
    assert body["error"].startswith("the request body could not be read")


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("application/x-www-form-urlencoded", b"username=\xff&password=\xfe"),
        ("application/x-www-form-urlencoded; charset=bogus", b"username=a&password=b"),
        ("multipart/form-data; boundary=zz", b"garbage"),
        ("multipart/form-data", b"garbage"),
    ],
    ids=["not-utf8", "unknown-charset", "bad-multipart", "no-boundary"],
)
async def test_a_login_form_that_cannot_be_parsed_is_400(
    make_box: BoxFactory, tmp_path: Path, content_type: str, data: bytes
) -> None:
    """Test that POST /login with a body that is no form is a 400 in the error shape, not a 500."""
    box = await make_box(secured_settings(tmp_path))
    status, body = await answer(box, "POST", "/login", data=data, headers={"Content-Type": content_type})
    assert status == 400
    assert body["error"].startswith("the request body could not be read")


async def raw_request(port: int, head: bytes, body_part: bytes) -> tuple[bytes, float]:
    """Send `head` and part of a body, then nothing: the server's answer (headers and body), and after how long
    it came whole."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = asyncio.get_running_loop().time()
    writer.write(head + body_part)
    try:
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(answer.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            answer += await reader.readexactly(length)
    finally:
        writer.close()
    return answer, asyncio.get_running_loop().time() - started


@pytest.mark.parametrize("path", ["/robots/R1/status", "/login", "/robots"])
async def test_a_body_that_stalls_is_408_within_the_idle_timeout(
    make_box: BoxFactory, tmp_path: Path, path: str
) -> None:
    """Test that a client that sends its headers and a few bytes of a declared 10 KB body, then nothing, is
    answered 408 (Connection: close) within --http-idle-timeout-s (it was held for ever), as is a chunked body that
    never ends. (aiohttp then still reads and drops what the client sends for its lingering time, 10 s.)"""
    settings = secured_settings(tmp_path) if path == "/login" else settings_with(tmp_path)
    box = await make_box(dataclasses.replace(settings, http_idle_timeout_s=0.3))
    port = box.server.port
    assert port is not None
    kind = "application/x-www-form-urlencoded" if path == "/login" else "application/json"
    sized = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nContent-Length: 10000\r\n\r\n"
    chunked = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n\r\n"
    for head, part in ((sized.encode(), b'{"battery'), (chunked.encode(), b'5\r\n{"bat\r\n')):
        answered, took = await raw_request(port, head, part)
        assert answered.startswith(b"HTTP/1.1 408"), answered[:200]
        assert b"Connection: close" in answered
        assert b"did not arrive within 0.3 s" in answered
        assert took < 3


async def test_a_client_that_leaves_mid_body_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that clients that drop their connection halfway through a body leave one quiet line each, no ERROR
    with a traceback (30 aborted logins logged 30 tracebacks). The app runs as `spotbox run` runs it: aiohttp's
    test server cancels a handler whose client left, `spotbox run` lets it see the lost connection."""
    caplog.set_level(logging.INFO)
    runner = web.AppRunner(create_app(secured_settings(tmp_path)), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        head = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        for leave in ("abort", "close"):  # a reset, or a FIN
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b"Content-Length: 1000\r\n\r\nusername=op")
            await writer.drain()
            await asyncio.sleep(0.3)  # the handler is reading the body
            writer.transport.abort() if leave == "abort" else writer.close()
        await asyncio.sleep(0.3)
        assert "the client went away" in caplog.text
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
        async with aiohttp.ClientSession() as other:
            form = {"username": "operator", "password": PASSWORDS["operator"], "next": "/"}
            async with other.post(f"http://127.0.0.1:{port}/login", data=form, allow_redirects=False) as resp:
                assert resp.status == 303
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "params",
    [{"limit": " 1"}, {"limit": "1_0"}, {"limit": "\u0661"}, {"start_time": "2026-11-30T10:00:00\x00"}],
    ids=["space", "underscore", "arabic-indic-digit", "trailing-nul"],
)
async def test_lenient_numbers_and_times_are_400(box: Box, params: dict[str, str]) -> None:
    """Test that query values Python's int() and fromisoformat() would take but are no plain integer or date-time
    are refused, naming the parameter."""
    async with box.http.post(f"{box.base_url}/robots/R1/status", data=payload()) as resp:
        assert resp.status == 202
    status, body = await answer(box, "GET", "/robots/R1/history", params=params)
    assert status == 400
    assert next(iter(params)) in body["error"]
