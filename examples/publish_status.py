"""Publish one robot status to spotbox over MQTT at QoS 1, and report whether spotbox accepted it.

Usage: python examples/publish_status.py [SERIAL]   (MQTT_HOST, MQTT_PORT from the environment)
"""

import asyncio
import os
import sys
from datetime import UTC, datetime

import aiomqtt
import orjson


async def main(serial: str) -> None:
    """Publish one status; PUBACK means spotbox validated and stored it (or rejected it: see below)."""
    status = {
        "battery_level": 76,
        "battery_status": "DISCHARGING",
        "driving_status": "IDLE",
        "current_drive_id": None,
        "location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0},
        "timestamp": datetime.now(UTC).isoformat(),
    }
    host, port = os.environ.get("MQTT_HOST", "127.0.0.1"), int(os.environ.get("MQTT_PORT", "1883"))
    async with aiomqtt.Client(host, port, protocol=aiomqtt.ProtocolVersion.V311) as client:
        await client.publish(f"robot/{serial}/status", orjson.dumps(status), qos=1)
    print(f"published and acknowledged: robot/{serial}/status")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ROBOT-001"))
