"""The typed keys under which each component sits on the aiohttp application."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from spotbox.cluster.forward import Forwarder
from spotbox.cluster.ingest import ClusterIngest
from spotbox.cluster.ops import SharedOps
from spotbox.cluster.rows import RowSource
from spotbox.cluster.stats import SharedStats
from spotbox.mqtt.broker import Broker
from spotbox.ops.service import Operations
from spotbox.pipeline import IngestPipeline
from spotbox.retention import Retention
from spotbox.runtime import Runtime
from spotbox.settings import Settings
from spotbox.sse import FeedHub
from spotbox.storage import Storage

SETTINGS = web.AppKey("settings", Settings)
# The files the settings name (users, TLS), read once by load_runtime.
RUNTIME = web.AppKey("runtime", Runtime)
STORAGE = web.AppKey("storage", Storage)
HUB = web.AppKey("hub", FeedHub)
PIPELINE = web.AppKey("pipeline", IngestPipeline)
BROKER = web.AppKey("broker", Broker)
METRICS = web.AppKey("metrics", CollectorRegistry)
RETENTION = web.AppKey("retention", Retention)
FORWARDERS = web.AppKey("forwarders", list[Forwarder])
# Cluster mode (--broker): this instance's share of the cluster's statuses.
CLUSTER = web.AppKey("cluster", ClusterIngest)
# On PostgreSQL: the one path from the status table to the hub (rows of every instance sharing the database).
ROWS = web.AppKey("rows", RowSource)
# On PostgreSQL: /stats for every instance sharing the database.
SHARED_STATS = web.AppKey("shared_stats", SharedStats)
SHARED_OPS = web.AppKey("shared_ops", SharedOps)
OPS = web.AppKey("ops", Operations)
