"""Publish one robot status with paho-mqtt (the plain, synchronous MQTT client) and report spotbox's answer.

MQTT 3.1.1 by default; a 3.1.1 PUBACK cannot say "invalid", so a rejected status shows up on
`spotbox/rejected/{serial}` instead. `--mqtt-version 5` speaks MQTT 5, where spotbox answers an invalid status with
PUBACK reason code 0x99 and a reason string naming the failing field.

Usage: python examples/publish_paho.py [SERIAL] [--mqtt-version 3.1.1|5] [--battery-level N]
Environment: MQTT_HOST (127.0.0.1), MQTT_PORT (1883), MQTT_USERNAME and MQTT_PASSWORD (when spotbox has users).
Exit status: 0 acknowledged, 1 no connection or no acknowledgement, 2 rejected (MQTT 5 only).
"""

import argparse
import json
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT_S = 10


def main() -> int:
    """Connect, publish one status at QoS 1, wait for the PUBACK and print what it says."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("serial", nargs="?", default="ROBOT-001")
    parser.add_argument("--mqtt-version", choices=["3.1.1", "5"], default="3.1.1")
    parser.add_argument("--battery-level", type=int, default=76)
    args = parser.parse_args()
    status = {
        "battery_level": args.battery_level,
        "battery_status": "DISCHARGING",
        "driving_status": "IDLE",
        "current_drive_id": None,
        "location": {"latitude": 52.52, "longitude": 13.405, "height": 34.0},
        "timestamp": datetime.now(UTC).isoformat(),
    }
    topic = f"robot/{args.serial}/status"

    protocol = mqtt.MQTTv5 if args.mqtt_version == "5" else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    if username := os.environ.get("MQTT_USERNAME"):
        client.username_pw_set(username, os.environ.get("MQTT_PASSWORD"))
    connected, acknowledged = threading.Event(), threading.Event()
    answers: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: Properties | None) -> None:
        answers["connect"] = code
        connected.set()

    def on_publish(_c: mqtt.Client, _u: object, _mid: int, code: ReasonCode, props: Properties | None) -> None:
        answers["puback"] = code
        answers["reason"] = getattr(props, "ReasonString", None)
        acknowledged.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, code: ReasonCode, _p: Properties | None) -> None:
        answers.setdefault("connect", code)
        connected.set()  # a refused or dropped connection must not leave main() waiting
        acknowledged.set()

    client.on_connect, client.on_publish, client.on_disconnect = on_connect, on_publish, on_disconnect
    host, port = os.environ.get("MQTT_HOST", "127.0.0.1"), int(os.environ.get("MQTT_PORT", "1883"))
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        print(f"cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        if not connected.wait(TIMEOUT_S) or answers["connect"].is_failure:
            print(
                f"MQTT {args.mqtt_version} connection refused: {answers.get('connect', 'no answer')}", file=sys.stderr
            )
            return 1
        client.publish(topic, json.dumps(status), qos=1)
        if not acknowledged.wait(TIMEOUT_S) or "puback" not in answers:
            print(f"{topic}: not acknowledged (connection lost)", file=sys.stderr)
            return 1
        code = answers["puback"]
        if code.is_failure:
            print(f"{topic}: rejected, {code} (0x{code.value:02x}): {answers['reason']}", file=sys.stderr)
            return 2
        print(f"published and acknowledged over MQTT {args.mqtt_version}: {topic}")
        return 0
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
