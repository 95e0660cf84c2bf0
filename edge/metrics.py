"""Prometheus metrics of one agent, served on ``[metrics] port`` (off when the section is absent).

Almost everything is read when Prometheus scrapes, from state the agent keeps anyway
(its counters, the camera's state, the buffer stats the status thread refreshes every
second), so inspection pays nothing for it. The two latency histograms are the exception:
the writer thread observes each committed decision (two ``observe`` calls, about a
microsecond each). Sync lag is the age of the oldest result the cloud has not
acknowledged, read at scrape time on a read-only connection of its own.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``, ``_bytes``); every
series carries no device label: Prometheus adds ``instance``, and the target's
``device`` label belongs in the scrape config (firmware-config/grafana-fleet.json uses it).

Drift: when the agent's status snapshot has a ``drift`` object (``state`` plus numeric
measures), it is exported as ``linewatch_drift_state{state=...}`` and
``linewatch_drift_measure{measure=...}``; nothing here needs to change when drift lands.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.capture import CameraPhase

logger = logging.getLogger(__name__)

DRIFT_STATES = ("ok", "warning", "drift")
# Inference takes ~0.3 ms on a small int8 CNN and tens of ms on a big tiled one.
INVOKE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Frame grabbed -> decision committed: dominated by the fsync, a few ms on an SSD.
DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The agent's registry: histograms fed by the writer, the rest read at scrape time.

    ``status`` is the agent's ``status_snapshot``; ``buffer_path`` the SQLite buffer.
    """

    def __init__(self, status: Callable[[], dict[str, Any]], buffer_path: Path) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.invoke_seconds = Histogram(
            "linewatch_invoke_seconds", "Model invoke time per decision", buckets=INVOKE_BUCKETS, registry=self.registry
        )
        self.decision_seconds = Histogram(
            "linewatch_decision_latency_seconds", "Frame grabbed to decision committed in the buffer",
            buckets=DECISION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_StatusCollector(status, Path(buffer_path)))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, invoke_ms: float | None, latency_ms: float) -> None:
        """One committed decision (called by the writer thread)."""
        if invoke_ms is not None:
            self.invoke_seconds.observe(invoke_ms / 1000.0)
        self.decision_seconds.observe(latency_ms / 1000.0)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` from a daemon thread; the port it listens on."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_address[1])
        logger.info("metrics on http://%s:%s/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
    return None if value is None else GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float | None) -> CounterMetricFamily | None:
    return None if value is None else CounterMetricFamily(name, doc, value=float(value))


def oldest_unsynced_ts(buffer_path: Path) -> float | None:
    """Capture time of the oldest result not yet acknowledged by the cloud (None: all synced)."""
    try:
        conn = sqlite3.connect(f"file:{buffer_path}?mode=ro", uri=True, timeout=0.5)
    except sqlite3.Error:
        return None
    try:
        # min(seq) per (synced, passed) prefix of the eviction index: two index seeks, not a scan.
        seqs = [conn.execute("SELECT min(seq) FROM results WHERE synced = 0 AND passed = ?", (p,)).fetchone()[0] for p in (0, 1)]
        first = min((s for s in seqs if s is not None), default=None)
        if first is None:
            return None
        row = conn.execute("SELECT ts FROM results WHERE seq = ?", (first,)).fetchone()
        return None if row is None else float(row[0])
    except sqlite3.Error as exc:
        logger.debug("sync lag not read: %s", exc)
        return None
    finally:
        conn.close()


class _StatusCollector(Collector):
    """Turns the agent's status snapshot into metric families at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]], buffer_path: Path) -> None:
        self._status = status
        self._buffer_path = buffer_path

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        families = list(self._families(s))
        yield from (f for f in families if f is not None)

    def _families(self, s: dict[str, Any]) -> Iterator[Metric | None]:
        session = s.get("session") or {}
        cam = s.get("camera") or {}
        yield _counter("linewatch_frames", "Frames the camera delivered", cam.get("frames"))
        yield _counter("linewatch_frames_dropped", "Frames dropped because inspection fell behind a live camera", cam.get("dropped"))
        yield _counter("linewatch_frames_bad", "Frames the camera delivered unreadable", cam.get("bad_frames"))
        decisions = CounterMetricFamily("linewatch_decisions", "Decisions committed to the buffer, by verdict", labels=["verdict"])
        decisions.add_metric(["pass"], float(session.get("passed", 0)))
        decisions.add_metric(["fail"], float(session.get("failed", 0)))
        yield decisions
        yield _counter("linewatch_errors", "Frames that could not be decided and writer errors", session.get("errors"))
        yield _counter("linewatch_samples", "JPEG samples kept", session.get("samples"))
        state = GaugeMetricFamily("linewatch_camera_state", "1 for the camera's current state", labels=["state"])
        current = cam.get("state")
        for name in sorted({*(phase.value for phase in CameraPhase), *([current] if current else [])}):
            state.add_metric([name], 1.0 if name == current else 0.0)
        yield state
        yield _counter("linewatch_camera_reconnects", "Times the camera was opened again after a loss", cam.get("reconnects"))
        yield _gauge("linewatch_camera_fps", "Frames per second the camera delivers now", cam.get("fps"))
        yield _gauge("linewatch_buffer_bytes", "Bytes the buffer's rows take (counted against the budget)", s.get("buffer_bytes"))
        yield _gauge("linewatch_buffer_unsynced_rows", "Results waiting for the cloud's ack", s.get("unsynced"))
        yield _gauge("linewatch_decisions_waiting", "Decisions made but not yet committed", s.get("decisions_waiting"))
        yield _gauge("linewatch_buffer_writable", "0 while the buffer cannot be written", 0.0 if s.get("buffer_error") else 1.0)
        evictions = s.get("evictions")
        if isinstance(evictions, dict):
            ev = CounterMetricFamily("linewatch_buffer_evictions", "Rows evicted from the buffer to stay in budget", labels=["kind"])
            for kind, n in sorted(evictions.items()):
                ev.add_metric([kind], float(n))
            yield ev
        oldest = oldest_unsynced_ts(self._buffer_path)
        yield GaugeMetricFamily(
            "linewatch_sync_lag_seconds", "Age of the oldest result the cloud has not acknowledged (0: all synced)",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )  # fmt: skip
        model = GaugeMetricFamily("linewatch_model_info", "The model the agent runs", labels=["version", "runtime"])
        model.add_metric([str(s.get("model_version")), str(s.get("runtime"))], 1.0)
        yield model
        ota = s.get("ota")
        if isinstance(ota, dict) and ota.get("state"):
            fam = GaugeMetricFamily("linewatch_ota_state", "1 for the OTA receiver's current state", labels=["state"])
            fam.add_metric([str(ota["state"])], 1.0)
            yield fam
        yield from _drift_families(s.get("drift"))
        yield _gauge("linewatch_start_time_seconds", "When the agent started (Unix time)", s.get("started"))


def _drift_families(drift: Any) -> Iterator[Metric | None]:
    """The hook for drift detection: a ``drift`` object in the status (state + numeric measures)."""
    if not isinstance(drift, dict):
        return
    current = drift.get("state")
    if current:
        fam = GaugeMetricFamily("linewatch_drift_state", "1 for the drift check's current state", labels=["state"])
        for name in sorted({*DRIFT_STATES, str(current)}):
            fam.add_metric([name], 1.0 if name == current else 0.0)
        yield fam
    measures = drift.get("measures", drift)
    if isinstance(measures, dict):
        fam = GaugeMetricFamily("linewatch_drift_measure", "Drift measures the agent reports", labels=["measure"])
        numeric = sorted(_numbers(measures))
        for k, v in numeric:
            fam.add_metric([k], v)
        if numeric:
            yield fam


def _numbers(measures: dict[str, Any], prefix: str = "", depth: int = 2) -> Iterator[tuple[str, float]]:
    """Numeric leaves of a measures object, nested keys joined with '.' (``brightness.value``)."""
    for key, value in measures.items():
        name = f"{prefix}{key}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, dict) and depth > 1:
            yield from _numbers(value, f"{name}.", depth - 1)
