"""Every file in examples/ runs as it is, against a running spotbox."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import Box

EXAMPLES = Path(__file__).parent.parent / "examples"


async def test_publish_and_follow_examples(box: Box) -> None:
    """Test that follow_feed.py prints the status that publish_status.py publishes."""
    env = {**os.environ, "MQTT_PORT": str(box.mqtt_port), "SPOTBOX_URL": box.base_url}
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "follow_feed.py"),
        "ROBOT-042",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        assert follower.stdout is not None
        assert await follower.stdout.readline() == b"following ROBOT-042\n"
        publisher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "publish_status.py"),
            "ROBOT-042",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await publisher.communicate()
        assert publisher.returncode == 0, err.decode()
        assert b"acknowledged" in out
        followed, err = await follower.communicate()
    assert follower.returncode == 0, err.decode()
    assert b" 76 IDLE" in followed
