"""The classic stack's subscriber service, for `spotbox bench`'s baseline: subscribe, validate, insert each.

Run as `python -m spotbox.classic PORT DATABASE_URL COUNT`: it subscribes to robot/+/status on the broker
at 127.0.0.1:PORT (QoS 1), validates each message with `jsonschema`, inserts it with its own commit, and
prints one JSON line `{"stored": n, "last_insert_wall": t}` once COUNT rows are stored.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime

import aiomqtt
import orjson

from spotbox.settings import BUNDLED_SCHEMA, DatabaseURL
from spotbox.status import status_topic_serial
from spotbox.storage import open_storage
from spotbox.validation import Rejection, StatusValidator


def _say(message: dict[str, object]) -> None:
    # stdout is this process's protocol with the bench: one JSON object per line.
    sys.stdout.write(orjson.dumps(message).decode() + "\n")
    sys.stdout.flush()


async def main(port: int, database_url: str, count: int) -> None:
    """Store `count` valid statuses one insert and one commit at a time, like a typical subscriber service."""
    validator = StatusValidator(BUNDLED_SCHEMA)
    storage = open_storage(DatabaseURL.parse(database_url))
    await storage.open()
    stored = 0
    async with aiomqtt.Client("127.0.0.1", port, identifier="classic-subscriber", max_queued_incoming_messages=0) as c:
        await c.subscribe("robot/+/status", qos=1)
        _say({"subscribed": True})
        async for message in c.messages:
            serial = status_topic_serial(str(message.topic))
            if serial is None or not isinstance(message.payload, bytes):
                continue
            record = validator.check(serial, message.payload, datetime.now(UTC))
            if isinstance(record, Rejection):
                continue
            await storage.write_batch([record])
            stored += 1
            if stored >= count:
                break
    await storage.close()
    _say({"stored": stored, "last_insert_wall": time.time()})


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
