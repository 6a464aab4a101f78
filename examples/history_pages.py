"""Read a robot's stored history page by page, following `next_cursor`, and print one line per status.

Usage: python examples/history_pages.py SERIAL [--start-time ISO] [--end-time ISO] [--page-size N]
Environment: SPOTBOX_URL (http://127.0.0.1:8000).
Prints `id ts battery_level driving_status latitude longitude`, oldest first, then a count of statuses and pages.
Only the standard library: copy it anywhere.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any


def pages(base: str, serial: str, query: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Every page of the history, requesting the next one with the cursor the previous one gave."""
    query = dict(query)
    while True:
        url = f"{base}/robots/{urllib.parse.quote(serial, safe='')}/history?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - the URL is spotbox's, http(s)
            page: dict[str, Any] = json.load(response)
        yield page
        if page["next_cursor"] is None:
            return
        query["cursor"] = page["next_cursor"]


def main() -> int:
    """Print the whole history of one robot in the asked time range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("serial")
    parser.add_argument("--start-time", help="ISO 8601, e.g. 2026-11-22T10:00:00Z")
    parser.add_argument("--end-time", help="ISO 8601")
    parser.add_argument("--page-size", type=int, default=500, help="statuses per request (1 to 5000)")
    args = parser.parse_args()
    base = os.environ.get("SPOTBOX_URL", "http://127.0.0.1:8000").rstrip("/")
    query = {"limit": str(args.page_size)}
    if args.start_time:
        query["start_time"] = args.start_time
    if args.end_time:
        query["end_time"] = args.end_time
    statuses = page_count = 0
    try:
        for page in pages(base, args.serial, query):
            page_count += 1
            for item in page["items"]:
                location = item["location"]
                print(
                    item["id"],
                    item["ts"],
                    item["battery_level"],
                    item["driving_status"],
                    location["latitude"],
                    location["longitude"],
                )
                statuses += 1
    except urllib.error.HTTPError as exc:
        # spotbox answers every error as {"error": ..., "detail": ...}.
        body = json.load(exc)
        print(f"HTTP {exc.code}: {body['error']} {json.dumps(body['detail'])}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"cannot reach {base}: {exc.reason}", file=sys.stderr)
        return 1
    print(f"{statuses} statuses in {page_count} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
