#!/bin/sh
# Publish one robot status with mosquitto_pub at QoS 1 over MQTT 3.1.1 (what spotbox's broker speaks today).
# A PUBACK means spotbox validated the status and committed it; an invalid one is acknowledged too (MQTT 3.1.1
# has no negative acknowledgement) and reported on spotbox/rejected/SERIAL instead.
#
# Usage: examples/publish_status.sh [SERIAL] [BATTERY_LEVEL]
# Environment: MQTT_HOST (127.0.0.1), MQTT_PORT (1883), MQTT_USERNAME and MQTT_PASSWORD (when spotbox has users).
set -eu

serial="${1:-ROBOT-001}"
battery_level="${2:-76}"
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

set -- -h "${MQTT_HOST:-127.0.0.1}" -p "${MQTT_PORT:-1883}" -V mqttv311 -q 1 -t "robot/$serial/status"
if [ -n "${MQTT_USERNAME:-}" ]; then
    set -- "$@" -u "$MQTT_USERNAME" -P "${MQTT_PASSWORD:-}"
fi

mosquitto_pub "$@" -m "{
  \"battery_level\": $battery_level,
  \"battery_status\": \"DISCHARGING\",
  \"driving_status\": \"IDLE\",
  \"current_drive_id\": null,
  \"location\": {\"latitude\": 52.52, \"longitude\": 13.405, \"height\": 34.0},
  \"timestamp\": \"$now\"
}"
echo "published and acknowledged: robot/$serial/status"
