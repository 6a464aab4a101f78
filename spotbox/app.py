"""The application factory: one aiohttp app owning storage, the ingest pipeline, the broker and the streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from spotbox import metrics
from spotbox.api import alerts, auth, dashboard, docs, feeds, fleet, forward, health, ingest, rejections, robots, stats
from spotbox.api.errors import error_middleware
from spotbox.api.proxies import parse_networks, proxy_middleware
from spotbox.cluster.client import BrokerURL
from spotbox.cluster.contexts import cluster_ctx, row_source_ctx, shared_stats_ctx
from spotbox.cluster.forward import ForwardConfig, Forwarder, keep_after_id
from spotbox.cluster.ops import SharedOps
from spotbox.errors import ConfigError, StorageError
from spotbox.keys import BROKER, FORWARDERS, HUB, OPS, PIPELINE, RETENTION, ROWS, RUNTIME, SETTINGS, SHARED_OPS, STORAGE
from spotbox.mqtt.broker import Broker
from spotbox.mqtt.listeners import MqttLimits
from spotbox.ops.alerts import Alert, Transition
from spotbox.ops.service import Operations
from spotbox.pipeline import IngestPipeline
from spotbox.retention import Retention
from spotbox.runtime import Runtime, load_runtime
from spotbox.settings import Settings
from spotbox.sse import FeedHub
from spotbox.status import StoredStatus, dumps
from spotbox.storage import open_storage
from spotbox.storage.postgres import PostgresStorage
from spotbox.validation import Rejection

logger = logging.getLogger(__name__)


async def storage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open (and migrate) the database for the app's lifetime."""
    settings = app[SETTINGS]
    storage = open_storage(settings.database)
    try:
        await storage.open()
    except StorageError as exc:
        # At start, an unusable database is a setting to change: name it (and where, without the password).
        where = "" if settings.database.scheme == "sqlite" else f" ({settings.database.redacted()})"
        raise ConfigError("--database-url", f"{exc}{where}") from exc
    logger.info("storage ready: %s", settings.database.redacted())
    app[STORAGE] = storage
    yield
    await storage.close()


def _rejected(app: web.Application, rejection: Rejection, received_at: datetime, raw: bytes) -> None:
    """A refused status: to the fleet feed, the rejection record and the alert rules, and upstream where
    rejections are forwarded."""
    # On PostgreSQL the RowSource sends it after the rows committed before it, as the hub alone would.
    (app[ROWS].rejected if ROWS in app else app[HUB].publish_rejected)(rejection, received_at)
    app[OPS].on_rejected(rejection, received_at, raw)
    if app[FORWARDERS]:
        report = dumps({**rejection.event(received_at), "gateway": app[SETTINGS].gateway_id})
        for forwarder in app[FORWARDERS]:
            forwarder.forward_event("rejection", f"spotbox/rejected/{rejection.serial_number}", report)


async def pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the one writer; on exit, let it commit what is still queued, then stop."""
    settings = app[SETTINGS]
    hub = app[HUB]
    ops = app[OPS]

    # On PostgreSQL committed rows reach the hub through the RowSource, with those of other instances.
    publish = app[ROWS].committed if ROWS in app else hub.publish

    def on_stored(rows: Sequence[StoredStatus]) -> None:
        publish(rows)
        ops.on_stored(rows)

    pipeline = IngestPipeline(
        app[STORAGE],
        app[RUNTIME].validator,
        on_stored,
        on_rejected=partial(_rejected, app),
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


async def ops_ctx(app: web.Application) -> AsyncIterator[None]:
    """Presence, the registry, alerts and the rejection record: read back at start, kept by background loops."""
    storage = app[STORAGE]
    ops = Operations(storage, app[SETTINGS], app[HUB])
    # On PostgreSQL, presence and alerts are kept in step with the other instances sharing the database.
    tick = app[SETTINGS].ops_tick_s
    shared = SharedOps(ops, storage, retry_s=tick, poll_s=tick) if isinstance(storage, PostgresStorage) else None
    if shared is not None:
        await shared.read_ends()
    await ops.start()
    if shared is not None:
        await shared.start()
        app[ROWS].followers.append(shared.follow)
        app[SHARED_OPS] = shared
    app[OPS] = ops

    def forward_alert(alert: Alert, transition: Transition, document: dict[str, Any]) -> None:
        # Upstream, where alert changes are forwarded (--forward, --forward-alerts): each change, as the webhook.
        if app[FORWARDERS]:
            change = dumps({"transition": transition.to_api(), "alert": document})
            for forwarder in app[FORWARDERS]:
                forwarder.forward_event("alert", f"spotbox/alerts/{alert.serial_number}", change)

    ops.written_listeners.append(forward_alert)
    tasks = [asyncio.create_task(ops.run(), name="spotbox-ops")]
    if shared is not None:
        tasks.append(asyncio.create_task(shared.run(), name="spotbox-shared-ops"))
    yield
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):
            logger.error("operations loops failed while stopping: %r", outcome)
    # The last alert changes and rejections reach the database before storage closes (once, no retrying).
    try:
        await ops.writer.write_pending(retry=False)
        await ops.rejections.flush()
    except Exception:
        logger.exception("last alert changes or rejections not written")
    if shared is not None:
        # Only now may another instance take over the rules: this one's last changes are written.
        await shared.close()


async def broker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the MQTT broker (spotbox.mqtt) and its TCP listener; on exit, settle what was read, then disconnect."""
    settings, runtime = app[SETTINGS], app[RUNTIME]
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
    broker = Broker(app[PIPELINE], runtime.users, limits)
    broker.presence = app[OPS].presence
    await broker.start()
    try:
        host, port = await broker.listen(
            settings.mqtt_host, settings.mqtt_port, runtime.ssl_context, sock=runtime.mqtt_socket
        )
    except BaseException:
        await broker.close()
        raise
    logger.info("mqtt listening on %s:%d%s", host, port, " (TLS)" if runtime.ssl_context else "")
    app[BROKER] = broker
    app[OPS].broker_ready(broker.publish_retained)
    yield
    await broker.close()


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Delete rows past the retention period in the background, once at start and then on a schedule."""
    settings = app[SETTINGS]
    assert settings.retention_days is not None
    # Rows not yet forwarded upstream are kept past their age, unless the operator allows dropping them.
    forwarders = [] if settings.forward_may_drop else app[FORWARDERS]
    retention = Retention(
        app[STORAGE],
        settings.retention_days,
        interval_s=settings.retention_interval_s,
        batch=settings.retention_batch,
        keep_after_id=partial(keep_after_id, forwarders),
    )
    app[RETENTION] = retention
    task = asyncio.create_task(retention.run(), name="spotbox-retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def forward_ctx(app: web.Application) -> AsyncIterator[None]:
    """Forward every committed status to each `--forward` target, from the database, until shutdown."""
    settings = app[SETTINGS]
    config = ForwardConfig(
        gateway_id=settings.gateway_id,
        prefix=settings.forward_topic_prefix,
        rate=settings.forward_rate,
        forward_rejections=settings.forward_rejections,
        forward_alerts=settings.forward_alerts,
        keep_alive=settings.forward_keepalive,
    )
    # mqtts:// targets are verified against --forward-ca, or the system's CAs.
    tls = ssl.create_default_context(cafile=settings.forward_ca)
    forwarders = [Forwarder(app[STORAGE], BrokerURL.parse(url, "--forward"), config, tls) for url in settings.forward]
    app[FORWARDERS].extend(forwarders)
    tasks = [asyncio.create_task(f.run(), name=f"spotbox-forward-{f.target}") for f in forwarders]
    for forwarder in forwarders:
        logger.info("forwarding every stored status to %s under %s", forwarder.target, config.prefix)
    yield
    for forwarder in forwarders:
        await forwarder.client.disconnect()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def close_streams(app: web.Application) -> None:
    """End every SSE stream so shutdown does not wait on clients (those that do not read are cut off)."""
    await app[HUB].shutdown()


async def disconnect_mqtt(app: web.Application) -> None:
    """Stop accepting and reading MQTT clients, acknowledge what was committed, disconnect them (TCP and /mqtt)."""
    if BROKER in app:
        await app[BROKER].close()


async def mqtt_websocket(request: web.Request) -> web.StreamResponse:
    """GET /mqtt: MQTT over WebSocket on the HTTP port."""
    return await request.app[BROKER].serve_websocket(request)


def _ingest_contexts(settings: Settings) -> list[Callable[[web.Application], AsyncIterator[None]]]:
    """Storage, operations, the pipeline, then the embedded broker or the cluster link; on PostgreSQL, what
    instances share (the feeds' row source, /stats)."""
    postgres = settings.database.scheme == "postgresql"
    return [
        storage_ctx,
        *([row_source_ctx] if postgres else []),
        ops_ctx,
        pipeline_ctx,
        *([shared_stats_ctx] if postgres else []),
        cluster_ctx if settings.broker is not None else broker_ctx,
    ]


def create_app(settings: Settings, runtime: Runtime | None = None) -> web.Application:
    """Build the spotbox application (reading the files the settings name unless given); nothing starts yet."""
    # --max-payload bounds an HTTP status body as it bounds an MQTT payload.
    # The error shape wraps everything, the login check included.
    middlewares: list[Middleware] = [error_middleware, auth.read_auth_middleware]
    if settings.trusted_proxies:
        # First: every handler and the login check see the client's address.
        middlewares.insert(0, proxy_middleware(parse_networks(settings.trusted_proxies)))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_payload)
    app[SETTINGS] = settings
    app[RUNTIME] = runtime if runtime is not None else load_runtime(settings)
    app[HUB] = FeedHub(max_streams=settings.max_streams)
    app[FORWARDERS] = []
    app.cleanup_ctx.extend(_ingest_contexts(settings))
    if settings.forward:
        app.cleanup_ctx.append(forward_ctx)
    if settings.retention_days is not None:
        app.cleanup_ctx.append(retention_ctx)
    app.on_shutdown.extend([disconnect_mqtt, close_streams])
    if settings.broker is None:  # cluster mode has no broker here: /mqtt is then a 404 in the JSON error shape
        app.router.add_get("/mqtt", mqtt_websocket)
    auth.add_routes(app)
    robots.add_routes(app)
    health.add_routes(app)
    feeds.add_routes(app)
    metrics.add_routes(app)
    docs.add_routes(app)
    fleet.add_routes(app)
    ingest.add_routes(app)
    stats.add_routes(app)
    alerts.add_routes(app)
    rejections.add_routes(app)
    dashboard.add_routes(app)
    forward.add_routes(app)
    return app
