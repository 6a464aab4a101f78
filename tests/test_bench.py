"""`spotbox bench` runs end to end and reports the figures it promises (the figures themselves are not judged)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import orjson
import pytest

from spotbox import loadgen
from spotbox.bench import BenchConfig, followed
from spotbox.bench_logins import run_logins
from tests.conftest import SPOTBOX, require_tool


async def bench_json(*args: str) -> Any:
    """Run `spotbox bench ARGS --json` as a user would; its figures."""
    proc = await asyncio.create_subprocess_exec(
        SPOTBOX, "bench", *args, "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(120):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out)


@pytest.mark.slow  # a spotbox run, a Mosquitto and a subscriber process, publishers: about 5 s of two cores
async def test_bench_json_reports_both_stacks() -> None:
    """Test that a small bench run stores every message it sent and reports spotbox and the classic stack."""
    require_tool("mosquitto")  # the classic stack's broker
    # Paced over 2.5 s, so the server's memory is sampled more than once.
    figures = await bench_json(
        *("--robots", "2", "--messages", "200", "--sse", "2", "--baseline-messages", "50", "--rate", "80")
    )
    assert figures["stored"] == 200
    assert figures["stored_per_s"] > 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert 0 < figures["latency_ms"]["steady_p50"] <= figures["latency_ms"]["steady_p99"]
    assert 0 < figures["ack_latency_ms"]["p50"] <= figures["ack_latency_ms"]["p99"]
    assert figures["connect_spread_s"] >= 0
    assert figures["peak_rss_mb"] > 0
    assert figures["server_cpu_us_per_status"] > 0
    assert 0 < figures["server_cpu_us_per_status_connected"] <= figures["server_cpu_us_per_status"]
    assert 0 < figures["rss_mb"]["warm"] <= figures["peak_rss_mb"]
    assert 0 < figures["rss_mb"]["end"] <= figures["peak_rss_mb"]
    assert figures["baseline"]["stored"] == 50
    assert figures["ratio_vs_baseline"] > 0


@pytest.mark.slow  # a spotbox run and its publishers per QoS
@pytest.mark.parametrize("qos", ["0", "2"])
async def test_bench_at_other_qos(qos: str) -> None:
    """Test that a bench run at QoS 0 (timed by the database) and QoS 2 (PUBREC/PUBREL/PUBCOMP) stores every status."""
    figures = await bench_json(*("--robots", "2", "--messages", "100", "--sse", "1", "--qos", qos, "--no-baseline"))
    assert figures["config"]["qos"] == int(qos)
    assert figures["stored"] == 100
    assert figures["baseline"] is None


@pytest.mark.parametrize("qos", [1, 2])
async def test_loadgen_speaks_mqtt5(tmp_path: Path, qos: int) -> None:
    """Test that the bench's publishers complete MQTT 5 flows with a real MQTT 5 broker (Mosquitto)."""
    mosquitto = require_tool("mosquitto")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = await asyncio.create_subprocess_exec(mosquitto, "-c", str(conf), stderr=asyncio.subprocess.PIPE)
    try:
        assert broker.stderr is not None
        async with asyncio.timeout(10):
            while b"running" not in await broker.stderr.readline():
                pass
            result = await loadgen.drive("127.0.0.1", port, loadgen.Load(2, 50, qos=qos, version="5"))
    finally:
        broker.terminate()
        await broker.wait()
    assert result.acked == result.sent == 50
    assert result.errors == []


@pytest.mark.slow  # four spotbox processes and an uplink reconnect: about 15 s
async def test_bench_measures_forwarding_and_its_catch_up() -> None:
    """Test that `bench --forward` stores every status with and without forwarding and sees them all upstream, and
    `--forward-backlog` reports live ingest beside a catch-up and the drain rate."""
    require_tool("mosquitto")  # the upstream broker
    forward = await bench_json(*("--forward", "--robots", "2", "--messages", "200", "--sse", "1"))
    assert forward["stored"] == 200
    assert forward["stored_per_s_without_forward"] > 0
    assert forward["forwarded_per_s"] > 0
    catch_up = await bench_json(
        *("--forward-backlog", "300", "--robots", "2", "--messages", "100", "--rate", "200", "--sse", "1")
    )
    assert catch_up["live_stored_per_s_without_catch_up"] > 0
    assert catch_up["live_stored_per_s_during_catch_up"] > 0
    assert catch_up["drained_per_s"] > 0


@pytest.mark.slow  # fills a database, then a spotbox run under a second of load per client
@pytest.mark.parametrize("client", ["aiohttp", "wrk"])
async def test_bench_reads_scenario_reports_requests(client: str) -> None:
    """Test that `--scenario reads` fills a database, drives the history route and reports rate and latency."""
    if client == "wrk":
        require_tool("wrk")
    figures = await bench_json(
        *("--scenario", "reads", "--rows", "2000", "--duration", "1", "--connections", "4", "--client", client)
    )
    assert figures["scenario"] == "reads"
    assert figures["client"] == client
    assert figures["config"]["rows"] == 2000
    assert figures["requests"] > 0
    assert figures["errors"] == 0
    assert figures["requests_per_s"] > 0
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"] <= figures["latency_ms"]["max"]
    assert figures["server_cpu_us_per_request"] > 0


@pytest.mark.slow  # a spotbox run with six feeds and publishers
async def test_bench_fanout_reports_feeds() -> None:
    """Test that --sse-consoles and --sse-robot-pages add the feeds' delivery figures to an ingest run."""
    figures = await bench_json(
        *("--robots", "2", "--messages", "200", "--sse", "0", "--no-baseline"),
        *("--sse-consoles", "2", "--sse-robot-pages", "4"),
    )
    assert figures["stored"] == 200
    fanout = figures["fanout"]
    assert (fanout["consoles"], fanout["robot_pages"], fanout["overflowed"]) == (2, 4, 0)
    assert 0 < fanout["feed_p99_ms"]["median"] <= fanout["feed_p99_ms"]["max"]


async def _acknowledging_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal MQTT 3.1.1 peer for the load generator: CONNACK, then a PUBACK for each QoS 1 PUBLISH at once."""
    try:
        while True:
            first, body = await loadgen.read_packet(reader)
            if first >> 4 == 1:
                writer.write(b"\x20\x02\x00\x00")
            elif first >> 4 == 3:
                topic_len = int.from_bytes(body[:2])
                writer.write(b"\x40\x02" + body[2 + topic_len : 4 + topic_len])
            elif first >> 4 == 14:
                break
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def test_paced_robot_keeps_one_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test that a paced robot with a window of 10, whose acknowledgements come back before its next send time,
    wakes a number of times linear in its messages: one pending timer at most, not one more per acknowledgement
    (40 messages took 859 wake-ups, 200 took 20,299, inflating the bench client's CPU figures)."""
    calls = 0
    send_due = loadgen._Robot._send_due

    def counted(self: loadgen._Robot) -> None:
        nonlocal calls
        calls += 1
        send_due(self)

    monkeypatch.setattr(loadgen._Robot, "_send_due", counted)
    server = await asyncio.start_server(_acknowledging_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    messages = 60
    async with server, asyncio.timeout(10):
        # 600 a second: a send every 1.7 ms, far longer than a loopback acknowledgement takes.
        result = await loadgen.drive("127.0.0.1", port, loadgen.Load(1, messages, window=10, rate=600))
    assert result.acked == result.sent == messages
    # One call per acknowledgement and one per timer at most, plus the start.
    assert calls <= 2 * messages + 1


@pytest.mark.parametrize(
    ("robots", "sse", "expected"),
    [
        (10, 10, list(range(10))),
        (3, 10, [0, 1, 2]),
        (10_000, 4, [0, 2500, 5000, 7500]),
    ],
)
def test_followed_robots_are_spread_over_the_fleet(robots: int, sse: int, expected: list[int]) -> None:
    """Test that the robots followed over SSE are spread over the fleet, so over the phases of a paced load (the
    first robots of a large fleet all publish within a few milliseconds of each other)."""
    assert followed(BenchConfig(robots=robots, sse=sse)) == expected


async def test_logins_bench_logs_every_robot_in_and_reconnects_cost_no_hash() -> None:
    """Test that `spotbox bench --scenario logins` logs every robot in to a real `spotbox run --users` twice, and
    that the second time (passwords remembered) costs the server far less CPU a login than the argon2 check."""
    figures = await run_logins(12)
    assert figures["robots"] == 12
    first, again = figures["first"], figures["again"]
    # An argon2 check is about 18 ms of CPU here; a remembered login a fraction of a millisecond.
    assert first["server_cpu_ms_per_login"] > 5 * again["server_cpu_ms_per_login"], figures
    assert again["logins_per_s"] > first["logins_per_s"], figures
