"""GET /metrics: Prometheus text counting real MQTT traffic, one registry per app."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotbox.settings import Settings
from tests.conftest import Box, BoxFactory
from tests.helpers import mqtt_client, open_feed, payload, stamp

pytestmark = pytest.mark.sqlite_only  # asserts nothing that depends on the storage backend (tests/conftest.py)


async def scrape(box: Box) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser, keyed by name and labels."""
    async with box.http.get(f"{box.base_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_real_mqtt_traffic(box: Box) -> None:
    """Test that /metrics counts received, stored, duplicate, rejected-by-reason statuses, commits, clients, feeds."""
    async with (
        open_feed(box.http, f"{box.base_url}/robots/R1/feed") as feed,
        mqtt_client(box.mqtt_port) as robot,
        mqtt_client(box.mqtt_port) as _second_client,
    ):
        for n in range(3):
            await robot.publish("robot/R1/status", payload(timestamp=stamp(n)), qos=1)
        await robot.publish("robot/R1/status", payload(timestamp=stamp(0)), qos=1)  # redelivered: a duplicate
        await robot.publish("robot/R1/status", payload(battery_level=0), qos=1)
        await robot.publish("robot/R1/status", payload(battery_level=101), qos=1)
        await robot.publish("robot/R1/status", b"[]", qos=1)
        async with asyncio.timeout(10):
            for _ in range(3):
                await feed.next()
        metrics = await scrape(box)
    assert metrics["spotbox_messages_received_total"] == 7
    assert metrics["spotbox_messages_stored_total"] == 3
    assert metrics["spotbox_messages_duplicates_total"] == 1
    assert metrics['spotbox_messages_rejected_total{reason="battery_level"}'] == 2
    assert metrics['spotbox_messages_rejected_total{reason="payload"}'] == 1
    assert metrics["spotbox_queue_depth"] == 0
    # Every commit is one observation: at least one batch, at most one per valid status.
    commits = metrics["spotbox_batch_commit_seconds_count"]
    assert 1 <= commits <= 4
    assert metrics['spotbox_batch_commit_seconds_bucket{le="+Inf"}'] == commits
    assert metrics["spotbox_batch_commit_seconds_sum"] > 0
    assert metrics["spotbox_mqtt_clients_connected"] == 2
    assert metrics["spotbox_mqtt_connections_paused"] == 0
    assert metrics["spotbox_sse_streams_open"] == 1


async def test_each_app_has_its_own_registry(make_box: BoxFactory, tmp_path: Path) -> None:
    """Test that two spotbox apps in one process report their own traffic only (no global registry)."""
    boxes = [
        await make_box(Settings(http_port=0, mqtt_port=0, database_url=f"sqlite:///{tmp_path / name}", batch_wait_ms=1))
        for name in ("a.db", "b.db")
    ]
    async with mqtt_client(boxes[0].mqtt_port) as robot:
        await robot.publish("robot/R1/status", payload(), qos=1)
    first, second = [await scrape(box) for box in boxes]
    assert first["spotbox_messages_stored_total"] == 1
    assert second["spotbox_messages_stored_total"] == 0
    assert second["spotbox_batch_commit_seconds_count"] == 0


async def test_standard_process_and_python_series(box: Box) -> None:
    """Test that /metrics carries the standard process_* and python_* series of this very process."""
    metrics = await scrape(box)
    assert metrics["process_resident_memory_bytes"] > 0
    assert metrics["process_open_fds"] > 0
    assert metrics["process_cpu_seconds_total"] > 0
    assert 0 < metrics["process_start_time_seconds"] <= time.time()
    version = sys.version_info
    info = f'python_info{{implementation="CPython",major="{version.major}",minor="{version.minor}",'
    assert any(name.startswith(info) for name in metrics)
    assert 'python_gc_collections_total{generation="0"}' in metrics
