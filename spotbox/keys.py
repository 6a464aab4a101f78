"""The typed keys under which each component sits on the aiohttp application."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry

from spotbox.cluster.forward import Forwarder
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
OPS = web.AppKey("ops", Operations)
