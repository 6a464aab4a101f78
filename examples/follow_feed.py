"""Follow one robot's live feed (Server-Sent Events) and print each status as it arrives (and each alert change).

Usage: python examples/follow_feed.py [SERIAL] [COUNT]   (SPOTBOX_URL from the environment)
"""

import asyncio
import json
import os
import sys

import aiohttp


async def main(serial: str, count: int) -> None:
    """Print `count` statuses of `serial` (0: forever)."""
    base = os.environ.get("SPOTBOX_URL", "http://127.0.0.1:8000")
    seen = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"{base}/robots/{serial}/feed") as resp:
        print(f"following {serial}", flush=True)
        event = "message"
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: ") and event == "alert":
                alert = json.loads(line[len("data: ") :])
                print("alert", alert["rule"], alert["state"], alert["message"], flush=True)
            elif line.startswith("data: ") and event == "status":
                status = json.loads(line[len("data: ") :])
                print(status["id"], status["ts"], status["battery_level"], status["driving_status"], flush=True)
                seen += 1
                if seen == count:
                    return


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ROBOT-001", int(sys.argv[2]) if len(sys.argv) > 2 else 0))
