"""A real Mosquitto broker started by a test on a free port: the cloud of store-and-forward, the cluster's broker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spotbox.bench import free_port
from tests.conftest import require_tool


@dataclass
class Mosquitto:
    """One mosquitto process on 127.0.0.1:port, which a test may stop, restart, freeze and thaw."""

    binary: str
    config: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it and return once it accepts connections."""
        log = self.config.with_suffix(".log")
        with log.open("ab") as sink:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - a daemon the test owns, waited on in stop()
                [self.binary, "-c", str(self.config)], stdout=sink, stderr=sink
            )
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                if self.process.poll() is not None:
                    pytest.fail(f"mosquitto did not start: {log.read_text()}")
                await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGTERM), thawing it first if frozen."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: the link goes silent, no FIN and no RST."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after freeze()."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def mosquitto_config(tmp_path: Path, port: int, extra: str = "") -> Path:
    """A config that listens on loopback only, anonymous, keeping sessions' queued messages in memory."""
    config = tmp_path / f"mosquitto-{port}.conf"
    config.write_text(
        # As root, Mosquitto would drop to its own user, who cannot read the test's files (ACLs, certificates).
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
        f"max_inflight_messages 100\n{extra}"
    )
    return config


@contextlib.contextmanager
def mosquitto_process(tmp_path: Path, extra: str = "") -> Iterator[Mosquitto]:
    """A Mosquitto of the test's own (never the machine's on 1883), stopped at the end."""
    binary = require_tool("mosquitto")
    port = free_port()
    broker = Mosquitto(binary, mosquitto_config(tmp_path, port, extra), port)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A started Mosquitto on a free port."""
    with mosquitto_process(tmp_path) as broker:
        await broker.start()
        yield broker


__all__ = ["Mosquitto", "free_port", "mosquitto", "mosquitto_process"]
