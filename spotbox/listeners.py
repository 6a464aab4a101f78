"""Bind the listening sockets before anything else starts, and say how to reach them once serving."""

from __future__ import annotations

import ipaddress
import logging
import resource
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from spotbox.errors import ListenError

logger = logging.getLogger(__name__)

# Descriptors spotbox needs beside its MQTT clients and SSE streams: database files and connections, listeners,
# the event loop's own, a margin.
_FD_RESERVE = 64

# A valid status for the logged mosquitto_pub line: a new user copies it as it is.
EXAMPLE_SERIAL = "ROBOT-001"
EXAMPLE_STATUS = (
    '{"battery_level": 80, "battery_status": "DISCHARGING", "driving_status": "IDLE", '
    '"location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0}}'
)


def bind(what: str, host: str, port: int, port_option: str, host_option: str) -> socket.socket:
    """A listening TCP socket on the first address `host` resolves to; ListenError names the option to change."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        # create_server sets SO_REUSEADDR (a restart is not held up by connections in TIME_WAIT) and listens:
        # clients that come early wait in the backlog until the server accepts, once everything is up.
        return socket.create_server(address[:2], family=family)
    except OSError as exc:
        raise ListenError(what, host, port, port_option, exc, host_option=host_option) from exc


@dataclass(frozen=True)
class Bound:
    """The two listening sockets of `spotbox run`, bound before storage is opened."""

    http: socket.socket
    # None in cluster mode (--broker): the MQTT cluster is the broker, spotbox listens for no MQTT client.
    mqtt: socket.socket | None

    def close(self) -> None:
        """Close both sockets (a socket already handed to a server is closed by it; closing twice is harmless)."""
        self.http.close()
        if self.mqtt is not None:
            self.mqtt.close()


def bind_both(http_host: str, http_port: int, mqtt_host: str, mqtt_port: int, *, mqtt: bool = True) -> Bound:
    """Bind HTTP, then MQTT (unless `mqtt` is false: cluster mode); if MQTT fails, the HTTP socket is released."""
    http = bind("HTTP", http_host, http_port, "--http-port", "--http-host")
    if not mqtt:
        return Bound(http, None)
    try:
        mqtt_socket = bind("MQTT", mqtt_host, mqtt_port, "--mqtt-port", "--mqtt-host")
    except BaseException:
        http.close()
        raise
    return Bound(http, mqtt_socket)


def _reachable(sock: socket.socket) -> tuple[str, int]:
    """Where a client on this machine reaches `sock`: a wildcard address becomes loopback."""
    host, port = sock.getsockname()[:2]
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    return host, port


def try_lines(
    http: socket.socket, mqtt: socket.socket, *, tls_cert: Path | None, users: bool, read_login: bool
) -> list[str]:
    """The `mosquitto_pub` and `curl` commands that reach this spotbox, for its real ports, ready to copy but for the
    password: with `users`, both log in as the example robot (`read_login`: the feed asks for it too)."""
    mqtt_host, mqtt_port = _reachable(mqtt)
    http_host, http_port = _reachable(http)
    url_host = f"[{http_host}]" if ":" in http_host else http_host
    scheme = "https" if tls_cert else "http"
    publish = ["mosquitto_pub", "-h", mqtt_host, "-p", str(mqtt_port), "-q", "1"]
    watch = ["curl", "-N"]
    if tls_cert is not None:
        # A self-signed certificate is its own CA; with a CA-signed one, the system's trust store is enough.
        publish += ["--cafile", str(tls_cert)]
        watch += ["--cacert", str(tls_cert)]
    if users:
        publish += ["-u", EXAMPLE_SERIAL, "-P", "PASSWORD"]
    if read_login:
        # A robot reads its own feed.
        watch += ["-u", f"{EXAMPLE_SERIAL}:PASSWORD"]
    publish += ["-t", f"robot/{EXAMPLE_SERIAL}/status", "-m", EXAMPLE_STATUS]
    watch.append(f"{scheme}://{url_host}:{http_port}/robots/{EXAMPLE_SERIAL}/feed")
    return [shlex.join(watch), shlex.join(publish)]


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft limit of open files to its hard limit; warn when `needed` (plus a reserve) is more.

    Each MQTT client and SSE stream holds a socket: with the common soft limit of 1,024 a fleet of a few thousand
    robots would be refused for want of descriptors, not of memory or CPU. The hard limit is the operator's to set
    (`ulimit -Hn`, systemd's LimitNOFILE, docker's --ulimit nofile).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    if needed + _FD_RESERVE > soft:
        logger.warning(
            "open files limit %d is below what the connection limits may need (%d): raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=) or lower --max-connections / --max-streams",
            soft,
            needed + _FD_RESERVE,
        )
    return soft
