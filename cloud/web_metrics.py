"""The cloud's Prometheus metrics, read from the store when Prometheus scrapes ``/metrics``.

The store is shared by every ingest worker, so its counters are the fleet's totals whichever
worker stored a message: one scrape of the web app covers all workers.

    linewatch_cloud_stored_total{kind}          rows stored (rate() of results = ingest rate)
    linewatch_cloud_duplicates_total{kind}      rows sent again and ignored
    linewatch_cloud_rejected_total{reason}      messages dropped by validation
    linewatch_cloud_acks_sent_total, linewatch_cloud_store_errors_total, linewatch_cloud_status_messages_total
    linewatch_cloud_devices{state}              devices online / offline_buffering / dead
    linewatch_cloud_device_last_seen_age_seconds{device}   per-device lag: time since it was last heard
    linewatch_cloud_device_backlog_rows{device} rows the device says are waiting to sync
    linewatch_cloud_device_evicted_rows_total{device}       rows the device evicted unsynced (gaps)
    linewatch_cloud_rollouts{state}             rollouts by state
    linewatch_cloud_rollout_devices{rollout,version,state}  device states of the 5 newest rollouts
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from cloud.store import DEVICE_STATES

if TYPE_CHECKING:
    from cloud.web import StoreReader

_PREFIXED = (("stored_", "linewatch_cloud_stored", "kind", "Rows stored, by kind"),
             ("duplicate_", "linewatch_cloud_duplicates", "kind", "Rows received again and ignored, by kind"),
             ("rejected_", "linewatch_cloud_rejected", "reason", "Messages dropped by validation, by reason"))  # fmt: skip
_PLAIN = {"acks_sent": "Acks published after a commit", "store_errors": "Store calls that failed (not acked)",
          "status_messages": "Status messages recorded", "internal_errors": "Messages not handled (bugs)"}  # fmt: skip


class CloudCollector(Collector):
    """Metric families built from the store at scrape time."""

    def __init__(self, reader: StoreReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Metric]:
        counters: dict[str, int] = {r["name"]: int(r["value"]) for r in self.reader.rows("SELECT name, value FROM counters")}
        for prefix, name, label, doc in _PREFIXED:
            fam = CounterMetricFamily(name, doc, labels=[label])
            for key, value in sorted(counters.items()):
                if key.startswith(prefix):
                    fam.add_metric([key[len(prefix) :]], float(value))
            yield fam
        for key, doc in _PLAIN.items():
            yield CounterMetricFamily(f"linewatch_cloud_{key}", doc, value=float(counters.get(key, 0)))
        now = time.time()
        devices = self.reader.fleet(now)
        states = GaugeMetricFamily("linewatch_cloud_devices", "Devices by fleet state", labels=["state"])
        for s in DEVICE_STATES:
            states.add_metric([s], float(sum(1 for d in devices if d["state"] == s)))
        yield states
        age = GaugeMetricFamily(
            "linewatch_cloud_device_last_seen_age_seconds", "Seconds since the device was last heard", labels=["device"]
        )
        backlog = GaugeMetricFamily("linewatch_cloud_device_backlog_rows", "Rows the device reports waiting to sync", labels=["device"])
        evicted = CounterMetricFamily(
            "linewatch_cloud_device_evicted_rows", "Rows the device evicted before they synced", labels=["device"]
        )
        for d in devices:
            if d["last_seen"] is not None:
                age.add_metric([d["device_id"]], max(0.0, now - d["last_seen"]))
            if d["backlog"] is not None:
                backlog.add_metric([d["device_id"]], float(d["backlog"]))
            evicted.add_metric([d["device_id"]], float(d["evicted"] or 0))
        yield from (age, backlog, evicted)
        yield from self._rollouts()

    def _rollouts(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("linewatch_cloud_rollouts", "Rollouts by state", labels=["state"])
        for r in self.reader.rows("SELECT state, count(*) AS n FROM ota_rollouts GROUP BY state"):
            by_state.add_metric([str(r["state"])], float(r["n"]))
        yield by_state
        fam = GaugeMetricFamily("linewatch_cloud_rollout_devices", "Device states in the newest rollouts",
                                labels=["rollout", "version", "state"])  # fmt: skip
        rows = self.reader.rows(
            "SELECT r.id, r.version, coalesce(d.state, 'waiting') AS state, count(*) AS n FROM ota_deployments d"
            " JOIN (SELECT id, version FROM ota_rollouts ORDER BY created DESC LIMIT 5) r ON r.id = d.rollout GROUP BY 1, 2, 3"
        )
        for r in rows:
            fam.add_metric([r["id"], r["version"], r["state"]], float(r["n"]))
        yield fam


def metrics_registry(reader: StoreReader) -> CollectorRegistry:
    """A registry holding the cloud's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CloudCollector(reader))
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
