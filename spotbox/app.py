"""The application factory: one aiohttp app owning storage, the ingest pipeline, the broker and the streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from spotbox import metrics
from spotbox.api import dashboard, docs, feeds, fleet, health, ingest, robots, stats
from spotbox.api.errors import error_middleware
from spotbox.keys import BROKER, HUB, PIPELINE, RETENTION, SETTINGS, STORAGE
from spotbox.mqtt.broker import Broker
from spotbox.mqtt.listeners import MqttLimits
from spotbox.pipeline import IngestPipeline
from spotbox.retention import Retention
from spotbox.settings import Settings
from spotbox.sse import FeedHub
from spotbox.storage import open_storage
from spotbox.validation import StatusValidator

logger = logging.getLogger(__name__)


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open (and migrate) the database for the app's lifetime."""
    settings = app[SETTINGS]
    storage = open_storage(settings.database)
    await storage.open()
    logger.info("storage ready: %s", settings.database.redacted())
    app[STORAGE] = storage
    yield
    await storage.close()


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the one writer; on exit, let it commit what is still queued, then stop."""
    settings = app[SETTINGS]
    hub = app[HUB]
    pipeline = IngestPipeline(
        app[STORAGE],
        StatusValidator(settings.schema_path, max_depth=settings.max_json_depth),
        hub.publish,
        on_rejected=hub.publish_rejected,
        queue_size=settings.queue_size,
        batch_max=settings.batch_max,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    app[PIPELINE] = pipeline
    writer = asyncio.create_task(pipeline.run(), name="spotbox-writer")
    yield
    try:
        # Both steps can wait on storage (a full queue, a batch being retried): bound them together.
        async with asyncio.timeout(settings.shutdown_timeout_s):
            await pipeline.stop()
            await writer
    except TimeoutError:
        logger.error(
            "writer did not finish within %.0f s; %d unacknowledged statuses not stored",
            settings.shutdown_timeout_s,
            pipeline.depth,
        )
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def broker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the MQTT broker (spotbox.mqtt) and its TCP listener; on exit, settle what was read, then disconnect."""
    settings = app[SETTINGS]
    limits = MqttLimits(
        max_payload=settings.max_payload,
        max_topic_length=settings.max_topic_length,
        max_connections=settings.max_connections,
        max_pending_logins=settings.max_pending_logins,
        connect_timeout_s=settings.connect_timeout_s,
        receive_maximum=settings.receive_maximum,
        max_keepalive=settings.max_keepalive,
        max_queued=settings.max_queued,
        max_outbound_bytes=settings.max_outbound_bytes,
    )
    broker = Broker(app[PIPELINE], settings.users, limits)
    await broker.start()
    try:
        host, port = await broker.listen(settings.mqtt_host, settings.mqtt_port, settings.ssl_context)
    except BaseException:
        await broker.close()
        raise
    logger.info("mqtt listening on %s:%d%s", host, port, " (TLS)" if settings.ssl_context else "")
    app[BROKER] = broker
    yield
    await broker.close()


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delete rows past the retention period in the background, once at start and then on a schedule."""
    settings = app[SETTINGS]
    assert settings.retention_days is not None
    retention = Retention(
        app[STORAGE], settings.retention_days, interval_s=settings.retention_interval_s, batch=settings.retention_batch
    )
    app[RETENTION] = retention
    task = asyncio.create_task(retention.run(), name="spotbox-retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def close_streams(app: web.Application) -> None:
    """End every SSE stream so shutdown does not wait on clients."""
    app[HUB].close_all()


async def disconnect_mqtt(app: web.Application) -> None:
    """Stop accepting MQTT clients and cut the connected ones, so shutdown waits on none of them (TCP or /mqtt)."""
    if BROKER in app:
        await app[BROKER].close()


async def mqtt_websocket(request: web.Request) -> web.StreamResponse:
    """GET /mqtt: MQTT over WebSocket on the HTTP port."""
    return await request.app[BROKER].serve_websocket(request)


def create_app(settings: Settings) -> web.Application:
    """Build the spotbox application; nothing starts until the app is run."""
    # --max-payload bounds an HTTP status body as it bounds an MQTT payload.
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_payload)
    app[SETTINGS] = settings
    app[HUB] = FeedHub()
    app.cleanup_ctx.extend([storage_ctx, pipeline_ctx, broker_ctx])
    if settings.retention_days is not None:
        app.cleanup_ctx.append(retention_ctx)
    app.on_shutdown.extend([disconnect_mqtt, close_streams])
    app.router.add_get("/mqtt", mqtt_websocket)
    robots.add_routes(app)
    health.add_routes(app)
    feeds.add_routes(app)
    metrics.add_routes(app)
    docs.add_routes(app)
    fleet.add_routes(app)
    ingest.add_routes(app)
    stats.add_routes(app)
    dashboard.add_routes(app)
    return app
