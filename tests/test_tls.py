"""TLS: spotbox run with a certificate speaks MQTT over TLS, HTTPS, and MQTT over secure WebSocket."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from spotbox.loadgen import connect_packet
from tests.helpers import mqtt_client, payload, stamp
from tests.raw_mqtt import raw_client
from tests.test_auth import PASSWORDS, login, write_users
from tests.test_cli import failed_start, spotbox_process

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)


async def test_tls_for_mqtt_websocket_and_http(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    """Test that clients verifying the certificate publish over MQTT/TLS and WSS and read history over HTTPS."""
    cert, key = certificate
    users = write_users(tmp_path / "users.json")
    trusted = ssl.create_default_context(cafile=str(cert))
    args = ("--mqtt-port", "0", "--http-port", "0", "--database-url", f"sqlite:///{tmp_path / 'spotbox.db'}")
    # With users, a public MQTT address is allowed: the same start a gateway on a plant network makes.
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--users", str(users), "--mqtt-host", "0.0.0.0")
    async with spotbox_process(*args, *tls) as box:
        async with mqtt_client(box.mqtt_port, tls_context=trusted, **login("ROBOT-A")) as robot:
            await robot.publish("robot/ROBOT-A/status", payload(timestamp=stamp(1)), qos=1)
        async with mqtt_client(
            box.http_port, transport="websockets", path="/mqtt", tls_context=trusted, **login("ROBOT-A")
        ) as robot:
            await robot.publish("robot/ROBOT-A/status", payload(timestamp=stamp(2)), qos=1)
        own = {"Authorization": aiohttp.encode_basic_auth("ROBOT-A", PASSWORDS["ROBOT-A"])}
        base = f"https://127.0.0.1:{box.http_port}"
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{base}/robots/ROBOT-A/history", ssl=trusted, headers=own) as resp,
        ):
            assert resp.status == 200
            page = await resp.json()
        assert [item["ts"] for item in page["items"]] == [stamp(1), stamp(2)]
        # Under TLS the console's session cookie is Secure: a browser never sends it over plain HTTP.
        form = {"username": "operator", "password": PASSWORDS["operator"], "next": "/"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{base}/login", data=form, ssl=trusted, allow_redirects=False) as resp,
        ):
            assert resp.status == 303
            cookie = resp.cookies["spotbox_session"]
            assert (cookie["secure"], cookie["httponly"], cookie["samesite"]) == (True, True, "Strict")

        # Plain MQTT on the TLS port gets no CONNACK: the bytes are not a TLS handshake.
        async with raw_client(box.mqtt_port) as plain:
            await plain.send(connect_packet("plain", username="ROBOT-A", password=PASSWORDS["ROBOT-A"]))
            async with asyncio.timeout(10):
                await plain.wait_closed_by_server()
        # A client that does not trust this certificate refuses the server: it really is the one serving.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", box.mqtt_port, ssl=ssl.create_default_context())


@pytest.mark.parametrize(
    ("which", "expected"),
    [("cert-only", "give both --tls-cert and --tls-key"), ("swapped", "cannot load the certificate")],
)
async def test_bad_tls_files_are_a_one_line_error(certificate: tuple[Path, Path], which: str, expected: str) -> None:
    """Test that a missing key or unusable files stop spotbox run with one line naming --tls-cert."""
    cert, key = certificate
    tls = ("--tls-cert", str(cert)) if which == "cert-only" else ("--tls-cert", str(key), "--tls-key", str(cert))
    error = await failed_start("--mqtt-port", "0", "--http-port", "0", *tls)
    assert "--tls-cert" in error
    assert expected in error
