"""GET /stats across instances sharing one PostgreSQL database: each saves its window, any answers for all.

The counts of the last hour live in each instance's memory (spotbox/stats.py). On PostgreSQL each instance saves
its snapshot under its name (--instance-id) every few seconds, and /stats adds the saved snapshots of the others
to its own live one. The others' part is at most `SAVE_EVERY_S` old; an instance gone for longer than the window
drops out.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import orjson

from spotbox.errors import StorageError
from spotbox.stats import StatsWindow
from spotbox.status import dumps
from spotbox.storage.postgres import PostgresStorage

logger = logging.getLogger(__name__)

SAVE_EVERY_S = 2.0


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several /stats snapshots (the same window), in the same shape."""
    total = _zero()
    robots: dict[str, dict[str, Any]] = {}
    for snapshot in snapshots:
        _add(total, snapshot)
        for serial, counts in snapshot["robots"].items():
            _add(robots.setdefault(serial, _zero()), counts)
    return {
        "window_s": max(snapshot["window_s"] for snapshot in snapshots),
        **_plain(total),
        "robots": {serial: _plain(robots[serial]) for serial in sorted(robots)},
    }


def _add(target: dict[str, Any], counts: dict[str, Any]) -> None:
    for key in ("received", "valid", "rejected"):
        target[key] += counts[key]
    target["rejected_by_reason"].update(counts["rejected_by_reason"])


def _zero() -> dict[str, Any]:
    return {"received": 0, "valid": 0, "rejected": 0, "rejected_by_reason": Counter()}


def _plain(counts: dict[str, Any]) -> dict[str, Any]:
    return {**counts, "rejected_by_reason": dict(counts["rejected_by_reason"])}


class SharedStats:
    """Saves this instance's window and merges the others' into /stats."""

    def __init__(self, storage: PostgresStorage, window: StatsWindow, instance: str) -> None:
        self.storage = storage
        self.window = window
        self.instance = instance

    async def snapshot_json(self) -> bytes:
        """This instance's live window plus the others' saved ones (its own only, while the database is away)."""
        own = self.window.snapshot_json()
        try:
            saved = await self.storage.instance_stats(self.window.window_s)
        except StorageError as exc:
            logger.warning("/stats: other instances' counts unavailable: %s", exc)
            return own
        others = [orjson.loads(raw) for name, raw in saved.items() if name != self.instance]
        return dumps(merge([orjson.loads(own), *others])) if others else own

    async def run(self) -> None:
        """Save the window every SAVE_EVERY_S until cancelled."""
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            try:
                await self.storage.save_instance_stats(self.instance, self.window.snapshot_json())
            except StorageError as exc:
                logger.debug("cannot save this instance's /stats window: %s", exc)
