"""PostgreSQL stopped and restarted under load: nothing acknowledged is lost, ingest resumes by itself.

The test runs a PostgreSQL server of its own (initdb and pg_ctl on a temporary directory and a free port): the
machine's shared server is never stopped or reconfigured.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
from pathlib import Path

import aiomqtt
import pytest

from spotbox.settings import Settings
from tests.conftest import BoxFactory, unavailable
from tests.helpers import mqtt_client, nth_status

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

MESSAGES = 600
STOP_AFTER = 150


def server_binaries() -> Path:
    """The directory holding initdb and pg_ctl (on PATH, or Debian's /usr/lib/postgresql/N/bin)."""
    found = shutil.which("pg_ctl")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install postgresql)")
    raise AssertionError("unreachable")


class PrivatePostgres:
    """A throwaway PostgreSQL server; run as the `postgres` user when the tests run as root (initdb refuses root)."""

    def __init__(self, bindir: Path, datadir: Path, port: int) -> None:
        self.bindir = bindir
        self.datadir = datadir
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root without a `postgres` user to run a private PostgreSQL server")
            os.chown(datadir, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    async def _run(self, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._as_user, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await proc.communicate()
        assert proc.returncode == 0, f"{args[0]} failed: {output.decode(errors='replace')}"

    async def init(self) -> None:
        """Create the cluster: trust authentication, no fsync wait during initdb."""
        pgdata = str(self.datadir / "pgdata")
        await self._run(str(self.bindir / "initdb"), "-D", pgdata, "-A", "trust", "-U", "postgres", "--no-sync")

    async def start(self) -> None:
        """Start the server on loopback and the chosen port, and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1"
        pgdata = str(self.datadir / "pgdata")
        log = str(self.datadir / "server.log")
        await self._run(str(self.bindir / "pg_ctl"), "-D", pgdata, "-l", log, "-o", options, "-w", "-t", "60", "start")

    async def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash: no shutdown checkpoint, recovery on the next start)."""
        await self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir / "pgdata"), "-m", mode, "-w", "stop")


async def test_postgres_restart_under_load_loses_nothing(
    make_box: BoxFactory, private_postgres: PrivatePostgres
) -> None:
    """Test that PostgreSQL stopped mid-load makes spotbox not ready; after a restart each status is stored once."""
    box = await make_box(Settings(http_port=0, mqtt_port=0, database_url=private_postgres.url, batch_wait_ms=1.0))
    acked: set[int] = set()
    enough = asyncio.Event()
    stopped = asyncio.Event()
    slots = asyncio.Semaphore(20)

    async def publish(client: aiomqtt.Client, n: int) -> None:
        if n >= STOP_AFTER + 20:
            # The rest of the load is sent while the database is down, whatever the speed of `pg_ctl stop`.
            await stopped.wait()
        async with slots:
            await client.publish("robot/ROBOT-PG/status", nth_status(n), qos=1)
        acked.add(n)
        if len(acked) >= STOP_AFTER:
            enough.set()

    # A robot that waits as long as it takes for its PUBACKs, as MQTT intends.
    async with mqtt_client(box.mqtt_port, timeout=120, max_inflight_messages=20) as robot:
        load = asyncio.gather(*(publish(robot, n) for n in range(MESSAGES)))
        async with asyncio.timeout(30):
            await enough.wait()
        await private_postgres.stop("immediate")
        stopped.set()
        async with asyncio.timeout(30):
            while box.pipeline.storage_available:  # noqa: ASYNC110 - a flag the writer sets; no event to wait on
                await asyncio.sleep(0.01)
        async with box.http.get(f"{box.base_url}/ready") as resp:
            assert resp.status == 503
            assert (await resp.json())["detail"]["storage"].startswith("unavailable")
        # MQTT and HTTP keep serving while the database is away.
        async with mqtt_client(box.mqtt_port) as other:
            await other.publish("robot/ROBOT-PG/cmd", b"stay", qos=1)
        async with box.http.get(f"{box.base_url}/health") as resp:
            assert resp.status == 200
        assert len(acked) < MESSAGES - 20, "statuses sent while the database was down were acknowledged"

        await private_postgres.start()
        async with asyncio.timeout(90):
            await load
    assert acked == set(range(MESSAGES))
    stored = [item["ts"] for item in await box.history("ROBOT-PG", limit="5000")]
    assert len(stored) == len(set(stored)) == MESSAGES, "a status was lost or stored twice"
    assert box.pipeline.storage_available
    async with box.http.get(f"{box.base_url}/ready") as resp:
        assert resp.status == 200
