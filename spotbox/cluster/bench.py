"""Cluster mode measured: stored statuses/s of one `spotbox run --broker` instance, then of two, on one Mosquitto.

`python -m spotbox.cluster.bench --database-url postgresql://postgres@127.0.0.1:5432/postgres` runs, for each
instance count: its own Mosquitto on a free port, an empty database (created and dropped), that many
`spotbox run --broker` processes, lean publishers that hand the whole load to Mosquitto at once (it acknowledges
them itself), then the time until every status is committed. One JSON line per run. A tool, not the runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from spotbox.bench import free_port
from spotbox.loadgen import connect_packet, mqtt_string, publish_packet

# The broker settings docs/scale-out.md recommends for Mosquitto in front of spotbox instances.
MOSQUITTO_CONFIG = """user root
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 1000000
max_inflight_messages 256
"""


def _status(n: int) -> bytes:
    return orjson.dumps(
        {
            "battery_level": 50,
            "battery_status": "DISCHARGING",
            "driving_status": "IDLE",
            "location": {"latitude": 1.0, "longitude": 2.0, "height": 3.0},
            "timestamp": f"2026-01-01T00:00:00.{n:06d}Z" if n < 1_000_000 else f"2026-01-02T00:00:{n % 60:02d}Z",
        }
    )


@contextlib.contextmanager
def _mosquitto(workdir: Path) -> Iterator[int]:
    port = free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(MOSQUITTO_CONFIG.format(port=port))
    binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}:/usr/sbin") or "mosquitto"
    process = subprocess.Popen(  # noqa: S603 - the machine's mosquitto, our own config
        [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise SystemExit("mosquitto did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


@contextlib.asynccontextmanager
async def _database(admin_url: str) -> AsyncIterator[str]:
    name = f"spotbox_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _start(database_url: str, broker_port: int, instance: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    http_port = free_port()
    spotbox = str(Path(sys.executable).parent / "spotbox")
    with log.open("ab") as sink:
        process = subprocess.Popen(  # noqa: ASYNC220, S603 - this environment's spotbox, owned and ended here
            [spotbox, "run", "--http-port", str(http_port), "--database-url", database_url],
            env=os.environ | {"SPOTBOX_BROKER": f"mqtt://127.0.0.1:{broker_port}", "SPOTBOX_INSTANCE_ID": instance},
            stdout=sink,
            stderr=sink,
        )
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
            writer.write(b"GET /ready HTTP/1.0\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                return process, http_port
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"spotbox did not become ready; see {log}")
        await asyncio.sleep(0.1)


async def _publish(port: int, robot: int, first: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(f"bench-pub-{robot}"))
    await reader.readexactly(4)
    topic = mqtt_string(f"robot/B{robot:03d}/status")
    for n in range(first, first + count):
        writer.write(publish_packet(topic, n % 65535 + 1, _status(n), 1))
    await writer.drain()
    await reader.readexactly(4 * count)  # every PUBACK: Mosquitto holds the load now
    writer.close()


async def run_once(admin_url: str, broker_port: int, instances: int, total: int, publishers: int) -> dict[str, float]:
    """One measured run: `instances` spotbox processes draining `total` statuses; the stored rate."""
    async with _database(admin_url) as database_url:
        workdir = Path(tempfile.mkdtemp(prefix="spotbox-cluster-bench-"))
        started = [await _start(database_url, broker_port, f"bench{i}", workdir / f"{i}.log") for i in range(instances)]
        try:
            conn = await asyncpg.connect(database_url)
            each = total // publishers
            cpu_before = sum(_cpu_s(process.pid) for process, _ in started)
            began = time.perf_counter()
            await asyncio.gather(*(_publish(broker_port, p, p * each, each) for p in range(publishers)))
            published = time.perf_counter() - began
            # Other processes commit: polling the table is the only way to see it.
            while (await conn.fetchval("SELECT count(*) FROM status")) < each * publishers:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - began
            cpu = sum(_cpu_s(process.pid) for process, _ in started) - cpu_before
            await conn.close()
        finally:
            for process, _ in started:
                process.terminate()
                process.wait(30)
            shutil.rmtree(workdir, ignore_errors=True)
    stored = each * publishers
    return {
        "instances": instances,
        "stored": stored,
        "seconds": round(elapsed, 2),
        "published_s": round(published, 2),
        "stored_per_s": round(stored / elapsed),
        # CPU time of every instance per stored status: comparable between runs on a busy machine.
        "server_cpu_us_per_status": round(cpu / stored * 1e6, 1),
    }


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(argv: list[str]) -> None:
    """Measure 1 instance, then 2, against one Mosquitto; print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--statuses", type=int, default=40_000)
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    for count in args.instances:
        # A Mosquitto per run: the sessions of a run's instances outlive them (that is the point), and a session
        # left in the group would take its share of the next run's statuses.
        with _mosquitto(Path(tempfile.mkdtemp(prefix="spotbox-mosquitto-"))) as port:
            result = await run_once(args.database_url, port, count, args.statuses, args.publishers)
        print(json.dumps(result), flush=True)  # noqa: T201 - a command-line tool's output


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
