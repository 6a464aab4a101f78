"""--trusted-proxies: behind a reverse proxy, logins and the loopback-only anonymous mode go by the client's address
(X-Forwarded-For as the trusted proxies appended it), never by a header an untrusted peer sent."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import aiohttp
import pytest

from spotbox.api.proxies import client_address, parse_networks
from spotbox.errors import ConfigError
from spotbox.settings import Settings
from tests.conformance import settings_with
from tests.conftest import Box, BoxFactory
from tests.raw_mqtt import CONNACK_ACCEPTED, connect_packet, ws_raw_client
from tests.test_auth import write_users

PROXIES = parse_networks(("10.0.0.0/8", "fd00::/8", "127.0.0.1"))


def folder(path: Path) -> Path:
    """`path`, created: one box's database folder."""
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # not a proxy: its header is not believed
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", [], "10.1.2.3"),
        # A client's own X-Forwarded-For stays on the left; the proxy appended the address it saw.
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        ("10.1.2.3", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two headers are one list
        ("10.1.2.3", ["198.51.100.1, 10.9.9.9"], "198.51.100.1"),  # two proxies in a row
        ("10.1.2.3", ["10.7.7.7, 10.9.9.9"], "10.7.7.7"),  # proxies all the way: the first of them
        ("10.1.2.3", ["198.51.100.1, not-an-address"], "10.1.2.3"),  # garbage ends the walk at the proxy
        ("10.1.2.3", ["6.6.6.6, ::ffff:198.51.100.1"], "198.51.100.1"),  # written plainly
        ("10.1.2.3", ["198.51.100.1:5555"], "198.51.100.1"),  # proxies that append the client's port
        ("10.1.2.3", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.1.2.3", ["fe80::1%eth0"], "fe80::1"),  # no zone text reaches the logs
        # Loopback named by a proxy on another host is that host's: the client is not on this machine.
        ("10.1.2.3", ["127.0.0.1"], "10.1.2.3"),
        ("10.1.2.3", ["203.0.113.9, 127.0.0.1"], "10.1.2.3"),
        ("127.0.0.1", ["127.0.0.1"], "127.0.0.1"),
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        ("::ffff:127.0.0.1", [" 2001:db8::7 "], "2001:db8::7"),  # an IPv4-mapped proxy address is that proxy
    ],
)
def test_the_client_address_is_read_past_trusted_proxies_only(peer: str, headers: list[str], expected: str) -> None:
    """Test the walk of X-Forwarded-For from the right past trusted proxies, and nothing an untrusted peer says."""
    assert client_address(peer, headers, PROXIES) == expected
    assert client_address(peer, headers, ()) == peer


def test_a_proxy_given_as_an_ipv4_mapped_address_is_that_ipv4_proxy() -> None:
    """Test that `--trusted-proxies ::ffff:10.0.0.5` (the form dual-stack logs show) trusts the peer 10.0.0.5."""
    assert client_address("10.0.0.5", ["198.51.100.1"], parse_networks(["::ffff:10.0.0.5"])) == "198.51.100.1"
    assert client_address("10.0.0.6", ["198.51.100.1"], parse_networks(["::ffff:10.0.0.4/127"])) == "10.0.0.6"


def test_a_trusted_proxy_that_is_no_address_is_refused_at_start(tmp_path: Path) -> None:
    """Test that a --trusted-proxies value that is not an address or network is a clear error at start."""
    with pytest.raises(ConfigError, match=re.escape("--trusted-proxies: 'proxy.local' is not an IP address or")):
        Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", trusted_proxies=("10.0.0.1", "proxy.local"))


async def ws_connack(box: Box, connect: bytes, forwarded_for: str | None) -> int:
    """The CONNACK return code of `connect` sent over /mqtt, the upgrade carrying X-Forwarded-For when given."""
    headers = None if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    async with ws_raw_client(box.http, box.base_url, headers) as ws:
        await ws.send(connect)
        packet = await ws.read_packet()
    assert packet is not None
    assert packet[0] == 0x20, packet
    return packet[1][1]


async def test_anonymous_mqtt_over_a_trusted_proxy_is_local_only_for_a_local_client(
    make_box: BoxFactory, tmp_path: Path
) -> None:
    """Test that without --users (anonymous MQTT from this machine only) a proxy on this machine does not make every
    client local: a WebSocket client the trusted proxy names as 203.0.113.9 is refused, one it names as loopback is
    accepted; without --trusted-proxies the header is not believed."""
    proxied = await make_box(settings_with(folder(tmp_path / "a"), trusted_proxies=("127.0.0.1",)))
    assert await ws_connack(proxied, connect_packet("far"), "203.0.113.9") == 5  # not authorized
    assert await ws_connack(proxied, connect_packet("near"), "127.0.0.1") == CONNACK_ACCEPTED
    assert await ws_connack(proxied, connect_packet("direct"), None) == CONNACK_ACCEPTED
    plain = await make_box(settings_with(folder(tmp_path / "b")))
    assert await ws_connack(plain, connect_packet("spoofed"), "203.0.113.9") == CONNACK_ACCEPTED


async def test_logins_through_a_trusted_proxy_count_against_the_client(
    make_box: BoxFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Test that with --users a wrong password through the trusted proxy is checked and logged as from the address
    the proxy names (so its penalty is that client's, not every robot's behind the proxy), over HTTP and MQTT over
    WebSocket, while a peer that is no proxy is taken at its own address whatever header it sends."""
    users = write_users(tmp_path / "users.json")
    box = await make_box(settings_with(folder(tmp_path / "a"), users_path=users, trusted_proxies=("127.0.0.1",)))
    caplog.set_level(logging.WARNING)
    wrong = {"Authorization": aiohttp.encode_basic_auth("operator", "wrong"), "X-Forwarded-For": "203.0.113.9"}
    async with box.http.get(f"{box.base_url}/robots", headers=wrong) as resp:
        assert resp.status == 401
    assert "bad username or password for 'operator' from 203.0.113.9" in caplog.text
    connect = connect_packet("ws-a", username="ROBOT-A", password="wrong")  # noqa: S106
    assert await ws_connack(box, connect, "198.51.100.4") != CONNACK_ACCEPTED
    assert "198.51.100.4 via 127.0.0.1:" in caplog.text
    caplog.clear()
    untrusted = await make_box(settings_with(folder(tmp_path / "b"), users_path=users, trusted_proxies=("10.0.0.0/8",)))
    async with untrusted.http.get(f"{untrusted.base_url}/robots", headers=wrong) as resp:
        assert resp.status == 401
    assert "bad username or password for 'operator' from 127.0.0.1" in caplog.text
    assert "203.0.113.9" not in caplog.text
