#!/bin/sh
# Follow live statuses as Server-Sent Events with curl: one robot's feed, or with no SERIAL the whole fleet's
# (which also carries `rejected` events). Each event is printed as it arrives (-N: no buffering); Ctrl-C stops.
# Resume after a disconnect without missing anything: LAST_EVENT_ID=<the last id: line you saw>.
#
# Usage: examples/follow_feed.sh [SERIAL]
# Environment: SPOTBOX_URL (http://127.0.0.1:8000), LAST_EVENT_ID (optional).
set -eu

base="${SPOTBOX_URL:-http://127.0.0.1:8000}"
if [ $# -gt 0 ]; then
    url="$base/robots/$1/feed"
else
    url="$base/feed"
fi

set -- -N --silent --show-error --fail "$url"
if [ -n "${LAST_EVENT_ID:-}" ]; then
    set -- "$@" -H "Last-Event-ID: $LAST_EVENT_ID"
fi
exec curl "$@"
