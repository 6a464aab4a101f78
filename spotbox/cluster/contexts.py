"""The app's cleanup contexts of cluster mode and of live feeds shared across instances (wired in app.py)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

from spotbox.cluster.client import BrokerURL
from spotbox.cluster.ingest import SHARED_STATUS_FILTER, ClusterIngest
from spotbox.cluster.rows import RowSource
from spotbox.cluster.stats import SharedStats
from spotbox.keys import CLUSTER, HUB, PIPELINE, ROWS, SETTINGS, SHARED_STATS, STORAGE
from spotbox.storage.postgres import PostgresStorage

logger = logging.getLogger(__name__)


async def row_source_ctx(app: web.Application) -> AsyncIterator[None]:
    """On PostgreSQL, feed the hub from the table (every instance's commits, in commit order); after storage_ctx."""
    storage = app[STORAGE]
    assert isinstance(storage, PostgresStorage)
    source = RowSource(app[HUB], storage)
    app[ROWS] = source
    task = asyncio.create_task(source.run(), name="spotbox-rows")
    yield
    await _cancel(task)


async def shared_stats_ctx(app: web.Application) -> AsyncIterator[None]:
    """On PostgreSQL, save this instance's /stats window and answer /stats for every instance; after pipeline_ctx."""
    storage = app[STORAGE]
    assert isinstance(storage, PostgresStorage)
    shared = SharedStats(storage, app[PIPELINE].window, app[SETTINGS].instance_id)
    app[SHARED_STATS] = shared
    task = asyncio.create_task(shared.run(), name="spotbox-shared-stats")
    yield
    await _cancel(task)


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cluster mode, in place of broker_ctx: take this instance's share of the statuses from the MQTT cluster."""
    settings = app[SETTINGS]
    storage = app[STORAGE]
    # Both checked by Settings: --broker is set, and needs PostgreSQL.
    assert settings.broker is not None
    assert isinstance(storage, PostgresStorage)
    url = BrokerURL.parse(settings.broker, "--broker")
    ingest = ClusterIngest(
        app[PIPELINE],
        storage,
        url,
        instance_id=settings.instance_id,
        session_expiry=settings.session_expiry_s,
        inflight=settings.cluster_inflight,
        # mqtts:// clusters are verified against the system's CAs (or --forward-ca, the one CA option).
        tls=ssl.create_default_context(cafile=settings.forward_ca),
    )
    app[CLUSTER] = ingest
    task = asyncio.create_task(ingest.run(), name="spotbox-cluster")
    logger.info("cluster mode: instance %s joins %s on %s", settings.instance_id, url, SHARED_STATUS_FILTER)
    yield
    # Let the statuses being committed be acknowledged, then leave cleanly; the rest is redelivered.
    await ingest.settle(settings.shutdown_timeout_s)
    await ingest.client.disconnect()
    await _cancel(task)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background loop and wait for it; at shutdown its last error is only worth a debug line."""
    task.cancel()
    # asyncpg may answer a query cancelled mid-flight with its own error instead of CancelledError.
    (outcome,) = await asyncio.gather(task, return_exceptions=True)
    if isinstance(outcome, Exception):
        logger.debug("%s ended with %r", task.get_name(), outcome)
