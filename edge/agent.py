"""The edge agent daemon: start-up, the inspection loop, the watchdog and shutdown.

Threads (one stop Event shared by all; every loop notices it within a second):

    capture     camera -> bounded queue               (edge.capture.Capture)
    inspect     queue -> model -> decided queue        (this module; never touches the network)
    writer      decided queue -> SQLite group commit -> report  (this module; owns the buffer)
    checkpoint  WAL -> main file, off the commit path  (edge.buffer.Checkpointer)
    sync        SQLite outbox -> MQTT, own process     (edge.sync_process.SyncProcess, optional)
    watchdog    restarts a stuck live capture
    status      refreshes buffer counts on its own connection, writes the live status file

The checkpoint and status threads run at a lower CPU priority (nice +10, per thread):
on a 2-core box they must never take a core from capture, inspection or the writer.

Inspection and commits overlap: while the writer waits for one group's fsync, the
inspect thread decides the next frames (both LiteRT's invoke and SQLite's fsync
release the GIL). The writer commits whatever is waiting as one group, so a paced
camera gets one commit per decision and a backlog gets one fsync per group. The
decided queue is bounded: when commits stall (a full disk), inspection waits, a file
source waits behind it and a live camera drops its oldest frames (counted).

A decision does not wait for its JPEG sample: the writer encodes the samples of a
committed group while it would otherwise idle, and they ride in the next transaction
(alone after 0.2 s without parts). ``kill -9`` can lose such a sample, never a decision.

Shutdown (SIGTERM/SIGINT) stops them in reverse order of dependency: capture stops
producing, inspection finishes the frame in flight, the writer commits what is queued,
sync flushes, the buffer closes. A decision is reported (``--echo``, status, MQTT) only
after its commit, and decisions are committed in frame order (one inspect thread, one
FIFO, one writer).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from edge.annotate import LastFailure, draw_box, shrink
from edge.buffer import Buffer, ResultRecord, SampleRecord, nice_this_thread
from edge.capture import CameraState, Capture, Frame, open_source, parse_source, redact_url
from edge.config import AgentConfig
from edge.drift import BASELINE_META_KEY, DriftMonitor, DriftSettings
from edge.exceptions import BufferStoreError
from edge.fsutil import atomic_write
from edge.inference import Classifier, Prediction
from edge.models import ModelStore

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0
MAX_GROUP = 32  # decisions committed together at most, when a backlog is waiting
# Decided but not yet committed. Bounded so a stalled disk cannot grow memory: only
# decisions that keep a sample hold their frame, so this is at most ~30 MB of frames.
DECIDED_QUEUE = 32
RETRY_MAX_S = 2.0  # longest wait between attempts to write a buffer that failed
# A file replayed faster than inspection: how long the writer may wait to fill a group.
BACKLOG_LINGER_S = 0.05
LINGER_POLL_S = 0.005


@dataclass(frozen=True)
class Decision:
    """A committed decision, as reported to the operator and the echo stream."""

    seq: int
    part_id: int
    ts: float
    label: str
    score: float
    passed: bool
    model_version: str
    latency_ms: float  # frame grabbed -> decision committed
    box: tuple[int, int, int, int] | None = None  # the deciding tile, camera-frame pixels


@dataclass(frozen=True, slots=True)
class _Decided:
    """A decision on its way from the inspect thread to the writer (not reported yet)."""

    rec: ResultRecord
    frame_ts: float
    sample_reason: str | None  # the writer encodes the JPEG after the commit, off the inspect thread
    image: np.ndarray | None  # only held for a sample or the operator's last failed part
    origin: tuple[int, int] = (0, 0)  # where the image's top-left pixel lies in the camera frame


class Sampler:
    """Chooses which frames are kept as JPEG samples, within hourly budgets.

    While drift measures are out of band, a separate hourly budget (``drift.samples_per_hour``)
    keeps pictures that show it, a third each at most for failures, the parts nearest the
    threshold and random parts, tagged ``drift_<kind>:<measures>``; the normal budget goes on
    beside it and alone once the measures are back in band.
    """

    def __init__(self, config: AgentConfig, threshold: Callable[[], float], seed: int | None = None) -> None:
        self.cfg = config.sampling
        self._drift_budget = config.drift.samples_per_hour
        self._threshold = threshold
        self._rng = random.Random(seed)
        self._hour = -1
        self._taken = 0
        self._reservoir_taken = 0
        self._drift_taken: dict[str, int] = {}

    def reason(self, pred: Prediction, now: float, drift: tuple[str, ...] = ()) -> str | None:
        hour = int(now // 3600)
        if hour != self._hour:
            self._hour, self._taken, self._reservoir_taken, self._drift_taken = hour, 0, 0, {}
        if drift:
            drift_why = self._drift_reason(pred, drift)
            if drift_why is not None:
                return drift_why
        if self._taken >= self.cfg.max_per_hour:
            return None
        why: str | None = None
        if not pred.passed and self.cfg.failed:
            why = "fail"
        elif abs(pred.score - self._threshold()) <= self.cfg.low_confidence_margin:
            why = "low_confidence"
        elif self._reservoir_taken < self.cfg.reservoir_per_hour and self._rng.random() < 0.01:
            # ~1% of parts until the hour's reservoir is full: a spread over the hour
            why = "reservoir"
            self._reservoir_taken += 1
        if why:
            self._taken += 1
        return why

    def _drift_reason(self, pred: Prediction, measures: tuple[str, ...]) -> str | None:
        per_kind = max(1, self._drift_budget // 3) if self._drift_budget else 0
        kinds = []
        if not pred.passed:
            kinds.append("fail")
        if abs(pred.score - self._threshold()) <= self.cfg.low_confidence_margin:
            kinds.append("near_threshold")
        if self._rng.random() < 0.1:  # ~10 % of parts: what the line looks like now
            kinds.append("random")
        # the first kind with budget left: a full kind does not starve the others
        for kind in kinds:
            if self._drift_taken.get(kind, 0) < per_kind:
                self._drift_taken[kind] = self._drift_taken.get(kind, 0) + 1
                return drift_reason(kind, measures)
        return None

    def encode(
        self, image: np.ndarray, box: tuple[int, int, int, int] | None = None, origin: tuple[int, int] = (0, 0)
    ) -> tuple[bytes, int, int]:
        """JPEG of ``image`` (longest side at most ``max_side``), with ``box`` (frame pixels) drawn when given."""
        image, scale = shrink(image, self.cfg.max_side)
        if box is not None:
            image = draw_box(image, box, origin=origin, scale=scale)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return buf.tobytes(), image.shape[1], image.shape[0]


def drift_reason(kind: str, measures: tuple[str, ...]) -> str:
    """``drift_<kind>:<measure>+<measure>``, within the 64 characters a sample's reason may hold."""
    return f"drift_{kind}:{'+'.join(measures)}"[:64]


def drift_settings(config: AgentConfig) -> DriftSettings:
    d = config.drift
    return DriftSettings(
        enabled=d.enabled, baseline_parts=d.baseline_parts, window_parts=d.window_parts, check_every=d.check_every,
        persist_checks=d.persist_checks, clear_checks=d.clear_checks, stride=d.stride, near_margin=d.near_margin,
        samples_per_hour=d.samples_per_hour,
    )


class Agent:
    """One inspection station: build with a config, ``start()``, later ``stop()`` and ``join()``."""

    def __init__(self, config: AgentConfig, *, echo: TextIO | None = None) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.echo = echo
        # The agent's threads are its parallelism (capture, inspect, writer). OpenCV's own
        # pool would split each preprocessing resize across the cores capture and the
        # writer need, and its idle workers spin in sched_yield (seen with perf): keep it
        # to the threads the model stage is given.
        cv2.setNumThreads(config.model.threads)
        self.models = ModelStore(config.model.path)
        self.classifier = self._load_classifier(self.models.current())
        self._next_classifier: Classifier | None = None
        self._swap_lock = threading.Lock()
        spec = parse_source(config.camera.source)
        self.capture = Capture(
            lambda: open_source(spec, fps=config.camera.fps, loop=config.camera.loop),
            source=spec.display,  # URL passwords masked: this shows in the status, events and logs
            maxsize=config.camera.queue_size,
            backpressure=not config.live_camera,
            on_state_change=self._on_camera_change,
        )
        self.sampler = Sampler(config, lambda: self.classifier.manifest.threshold)
        m = self.classifier.manifest
        self.drift = DriftMonitor(
            drift_settings(config), model_version=m.version, model_sha256=m.model.sha256, threshold=m.threshold,
            reference=m.reference, deferred=True,  # measured and checked by the writer (update), after its commits
        )
        self.started_at = time.time()
        self.mqtt_error: str | None = None  # why the MQTT link cannot work (TLS files), shown in the status
        self.ota_error: str | None = None
        self.first_decision_at: float | None = None
        self.counts = {"results": 0, "passed": 0, "failed": 0, "samples": 0, "errors": 0, "sample_errors": 0,
                       "samples_refused": 0}
        self._counts_lock = threading.Lock()  # "errors" is counted by two threads
        self.last: Decision | None = None
        # Only the operator page shows it; without the page no frame is held for it.
        self.last_failure: LastFailure | None = LastFailure() if config.operator.enabled else None
        self._events: list[tuple[str, dict[str, Any]]] = []  # written by the writer thread
        self._events_lock = threading.Lock()
        self._decided: queue.Queue[_Decided] = queue.Queue(maxsize=DECIDED_QUEUE)
        self._inspect_done = threading.Event()
        self._writer_done = threading.Event()
        self._buffer_ready = threading.Event()
        self._status_due = threading.Event()  # a state change: rewrite the status file now
        self._first_part_id = 0
        self._checkpointer_stats: Callable[[], dict[str, float]] | None = None
        self._threads: list[threading.Thread] = []
        self.buffer_stats: dict[str, Any] = {}
        self.sync: Any = None
        self.operator: Any = None
        self.metrics: Any = None  # edge.metrics.AgentMetrics when [metrics] is set
        self.metrics_port: int | None = None
        self.ota: Any = None
        self.buffer_error: str | None = None
        self.buffer_error_since: float | None = None
        self.fatal: BaseException | None = None

    # -- model -----------------------------------------------------------------------------

    def _load_classifier(self, bundle: Path) -> Classifier:
        clf = Classifier(bundle, runtime=self.config.model.runtime, num_threads=self.config.model.threads)
        logger.info("model %s %s loaded from %s (runtime %s)", clf.manifest.name, clf.version, bundle, clf.runtime)
        return clf

    def swap_model(self, classifier: Classifier) -> None:
        """Hand a validated model to the inspection loop; it switches between two frames."""
        with self._swap_lock:
            self._next_classifier = classifier

    # -- events ----------------------------------------------------------------------------

    def note_event(self, kind: str, **detail: Any) -> None:
        """Queue an event for the writer thread to record (it owns the buffer connection)."""
        with self._events_lock:
            self._events.append((kind, detail))

    def _take_events(self) -> list[tuple[str, dict[str, Any]]]:
        with self._events_lock:
            events, self._events = self._events, []
        drift_events = self.drift.take_events()
        if drift_events:
            self._status_due.set()  # a drift state change shows at once
        return events + drift_events

    def _count_error(self) -> None:
        with self._counts_lock:
            self.counts["errors"] += 1

    def _on_camera_change(self, old: CameraState, new: CameraState) -> None:
        if new.state in ("up", "down", "ended"):
            self.note_event(f"camera_{new.state}", source=new.source, error=new.last_error, reconnects=new.reconnects)
        self._status_due.set()  # the sync process reports camera state from the status file

    # -- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        writer = threading.Thread(target=self._writer_main, name="writer", daemon=True)
        writer.start()
        # The buffer is opened (and recovered if corrupt) before capture starts producing.
        self._buffer_ready.wait(30)
        if self.fatal:
            raise self.fatal
        inspect = threading.Thread(target=self._inspect_main, name="inspect", daemon=True)
        inspect.start()
        self.capture.start()
        watchdog = threading.Thread(target=self._watchdog_main, name="watchdog", daemon=True)
        watchdog.start()
        status = threading.Thread(target=self._status_main, name="status", daemon=True)
        status.start()
        self._threads = [inspect, writer, watchdog, status]
        if self.config.mqtt.enabled:
            from edge.checks import tls_problem

            # A TLS file problem turns sync and OTA off, never inspection; the status says why.
            self.mqtt_error = tls_problem(self.config.mqtt)
            if self.mqtt_error:
                logger.error("MQTT: %s; inspecting and buffering offline until it is fixed", self.mqtt_error)
            # The sync process reads the agent's live state from the status file: have one.
            self._write_status_file(state="running")
            self._start_sync()
            self._start_ota()
        if self.config.operator.enabled:
            self._start_operator_page()
        if self.config.metrics is not None:
            self._start_metrics()

    def _start_metrics(self) -> None:
        from edge.metrics import AgentMetrics

        m = self.config.metrics
        assert m is not None
        metrics = AgentMetrics(self.status_snapshot, self.config.buffer.path)
        try:
            self.metrics_port = metrics.serve(m.host, m.port)
        except OSError as exc:  # a taken port must not stop the line
            logger.warning("metrics not served on %s:%s (%s); inspection continues", m.host, m.port, exc)
            return
        self.metrics = metrics

    def _start_ota(self) -> None:
        from edge.ota import OtaClient

        try:
            self.ota = OtaClient(self.config, self)
            self.ota.start()
        except Exception as exc:  # noqa: BLE001 - an OTA setup fault must not stop inspection
            logger.error("OTA not started (%s); inspection continues, models stay as they are", exc)
            self.ota_error = f"OTA not started: {exc}"

    def _start_operator_page(self) -> None:
        from edge.operator import OperatorPage

        op = self.config.operator
        try:
            self.operator = OperatorPage(
                op.host, op.port, self.status_snapshot, self.config.buffer.path, last_failure=self.last_failure,
                token=op.access_token, max_clients=op.max_clients,
            )  # fmt: skip
        except OSError as exc:  # a taken port must not stop the line
            logger.warning("operator page not started on %s:%s (%s); inspection continues", op.host, op.port, exc)
            return
        self.operator.start()

    def _start_sync(self) -> None:
        from edge.sync_process import SyncProcess

        try:
            self.sync = SyncProcess(self.config)
            self.sync.start()
        except OSError as exc:  # no process to spare must not stop the line; the watchdog retries
            logger.warning("sync process not started: %s; retrying", exc)

    def stop(self) -> None:
        self.stop_event.set()
        self._status_due.set()

    def join(self, timeout: float = 2.0) -> None:
        """Stop producers first, then consumers; everything is closed within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.capture.stop()
        for t in self._threads:
            t.join(max(0.05, deadline - time.monotonic()))
        self.capture.join(max(0.05, deadline - time.monotonic()))
        if self.ota is not None:
            self.ota.stop()
            self.ota.join(max(0.1, deadline - time.monotonic()))
        if self.sync is not None:
            self.sync.stop()
            self.sync.join(max(0.1, deadline - time.monotonic()))
        if self.operator is not None:
            self.operator.close()
        if self.metrics is not None:
            self.metrics.close()
        self._write_status_file(state="stopped")

    # -- inspection ------------------------------------------------------------------------

    def _inspect_main(self) -> None:
        """Frames -> decisions, in frame order, handed to the writer (never reported here)."""
        part_id = self._first_part_id
        try:
            while not self.stop_event.is_set():
                try:
                    self._maybe_swap()
                    frame = self.capture.get(timeout=0.2)
                    if frame is None:
                        continue
                    part_id += 1
                    item = self._decide(frame, part_id)
                    if item is not None and not self._hand_over(item):
                        break
                except Exception as exc:  # noqa: BLE001 - the inspection thread must outlive any one failure
                    self._count_error()
                    logger.exception("inspection loop error (continuing): %s", exc)
                    self.stop_event.wait(1.0)
        finally:
            self._inspect_done.set()

    def _hand_over(self, item: _Decided) -> bool:
        """Queue a decision for the writer; waits while the queue is full (backpressure).

        False when it cannot be handed over: the writer is gone, or a stop came and the
        writer has not made room for a second (the decision was never reported).
        """
        stop_seen: float | None = None
        while True:
            try:
                self._decided.put(item, timeout=0.2)
                return True
            except queue.Full:
                if self._writer_done.is_set():
                    return False
                if self.stop_event.is_set():
                    stop_seen = stop_seen or time.monotonic()
                    if time.monotonic() - stop_seen > 1.0:
                        logger.warning("stopping with a decision the buffer did not take; it was never reported")
                        return False

    def _maybe_swap(self) -> None:
        with self._swap_lock:
            nxt, self._next_classifier = self._next_classifier, None
        if nxt is not None:
            old = self.classifier
            self.classifier = nxt
            self.note_event("model_switched", old=old.version, new=nxt.version)
            # The new model's reference replaces the old one and its statistics start afresh:
            # its first parts become its baseline, so the swap itself never reads as drift.
            m = nxt.manifest
            self.drift.reset(
                model_version=m.version, model_sha256=m.model.sha256, threshold=m.threshold, reference=m.reference,
                why=f"model switched to {m.version}",
            )
            self._status_due.set()
            logger.info("model switched %s -> %s", old.version, nxt.version)

    def _decide(self, frame: Frame, part_id: int) -> _Decided | None:
        clf = self.classifier
        image = frame.image
        roi = self.config.camera.roi
        origin = (0, 0)
        if roi is not None:
            x, y, w, h = roi
            image = image[y : y + h, x : x + w]
            origin = (x, y)
        try:
            if image.size == 0:
                raise ValueError(f"camera.roi {list(roi or ())} lies outside the {frame.image.shape[1]}x{frame.image.shape[0]} frame")
            pred = clf.predict(image)
            self.drift.observe(image, pred.score, pred.passed)  # never raises; copies 14 KB (docs/benchmarks.md, Drift)
            if self.ota is not None:
                self.ota.observe(pred, clf.version)  # health watch after a model switch
        except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the line
            if self.ota is not None:
                self.ota.observe_error(exc, clf.version)
            self._count_error()
            logger.warning("frame %s could not be decided: %s", frame.index, exc)
            self.note_event("inference_error", frame=frame.index, error=str(exc)[:500])
            return None
        rec = ResultRecord(
            ts=frame.ts,
            device_id=self.config.device_id,
            part_id=part_id,
            model_version=clf.version,
            label=pred.label,
            score=pred.score,
            passed=pred.passed,
            capture_ms=frame.wait_ms,
            preprocess_ms=pred.preprocess_ms,
            invoke_ms=pred.invoke_ms,
            box=frame_box(pred.box, origin),
        )
        why = self.sampler.reason(pred, frame.ts, self.drift.out_of_band())
        keep = why is not None or (not pred.passed and self.last_failure is not None)
        return _Decided(rec, frame.ts, why, image if keep else None, origin)

    # -- the writer ------------------------------------------------------------------------

    def _writer_main(self) -> None:
        """Owns the buffer: group commits in frame order, then reports; events and meta ride along."""
        cfg = self.config
        try:
            buffer = Buffer(
                cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, synchronous=cfg.buffer.synchronous,
                device_id=cfg.device_id, checkpoint="background",
            )
        except BaseException as exc:
            self.fatal = exc
            self._writer_done.set()
            self._buffer_ready.set()
            self.stop_event.set()
            return
        try:
            with buffer:
                self._writer_loop(buffer)
        finally:
            self._writer_done.set()

    def _writer_loop(self, buffer: Buffer) -> None:
        if buffer.checkpointer is not None:
            self._checkpointer_stats = buffer.checkpointer.stats
        self.buffer_stats = buffer.stats()
        self.counts["results"] = self.buffer_stats.get("results", 0)
        self.counts["passed"] = self.buffer_stats.get("passed", 0)
        self.counts["failed"] = self.buffer_stats.get("failed", 0)
        last = self.buffer_stats.get("last_result") or {}
        # The newest committed row is exact even after kill -9; meta covers an emptied table.
        part_id = max(int(buffer.meta_get("last_part_id") or 0), int(last.get("part_id") or 0))
        self._first_part_id = part_id
        # Same model as before the restart: keep its baseline rather than relearn "usual"
        # from a line that may have drifted meanwhile.
        self.drift.restore(buffer.meta_get(BASELINE_META_KEY))
        buffer.record_results(
            [],
            events=[
                ("start", {"pid": os.getpid(), "model_version": self.classifier.version, "runtime": self.classifier.runtime}),
                ("model_loaded", {"version": self.classifier.version, "path": str(self.classifier.bundle_dir)}),
            ],
        )
        self._buffer_ready.set()
        last_meta = time.monotonic()
        stop_seen: float | None = None
        # Samples go in *after* their decision: a decision is committed and reported
        # without waiting for its JPEG, which is encoded while the writer would idle
        # and rides in the next transaction (no fsync of its own while parts flow).
        unencoded: list[tuple[int, _Decided]] = []
        encoded: list[SampleRecord] = []
        while True:
            if unencoded:
                items = self._take(timeout=0)  # a backlog commits with these samples at once
                encoded += self._encode(unencoded)
                unencoded = []
                if not items:
                    items = self._take(timeout=0.2)
            else:
                items = self._take(timeout=0.2)
            if items and len(items) < MAX_GROUP and self._replaying_behind():
                items += self._linger(len(items))
            events = self._take_events()
            meta: dict[str, str] | None = None
            if items:
                part_id = int(items[-1].rec.part_id or part_id)
                if time.monotonic() - last_meta >= STATUS_INTERVAL_S:
                    meta, last_meta = {"last_part_id": str(part_id)}, time.monotonic()
            baseline = self.drift.take_baseline_record()
            if baseline is not None:
                meta = {**(meta or {}), BASELINE_META_KEY: baseline}
            if items or events or encoded or meta:
                try:
                    committed = self._commit_and_report(buffer, items, encoded, events, meta)
                except Exception as exc:  # noqa: BLE001 - the writer must outlive any one failure
                    self._count_error()
                    logger.exception("writer error (continuing): %s", exc)
                    encoded = []
                    self.stop_event.wait(1.0)
                    continue
                if committed is None:
                    break  # stopping while the buffer cannot be written: nothing was reported
                encoded = []
                unencoded = committed
                # Drift measures and checks, when due: after the commit, so no decision waits for them.
                self.drift.update()
            elif self.stop_event.is_set():
                # Done when inspection has handed over its last decision (or is stuck).
                stop_seen = stop_seen or time.monotonic()
                if self._decided.empty() and (self._inspect_done.is_set() or time.monotonic() - stop_seen > 1.0):
                    break
        try:
            last_samples = encoded + self._encode(unencoded)
            buffer.record_results(
                [], prior_samples=last_samples,
                events=[*self._take_events(), ("stop", {"results": self.counts["results"]})],
                meta={"last_part_id": str(part_id)},
            )
            self.counts["samples"] += len(last_samples)
            self.buffer_stats = buffer.stats()
        except BufferStoreError as exc:  # every reported decision is already committed
            logger.error("stop event not recorded: %s", exc)

    def _take(self, timeout: float, limit: int = MAX_GROUP) -> list[_Decided]:
        """Whatever is waiting (at most ``limit``), after waiting up to ``timeout`` for the first."""
        try:
            items = [self._decided.get(timeout=timeout)] if timeout > 0 else [self._decided.get_nowait()]
        except queue.Empty:
            return []
        while len(items) < limit:
            try:
                items.append(self._decided.get_nowait())
            except queue.Empty:
                break
        return items

    def _replaying_behind(self) -> bool:
        """A file or folder replayed faster than it is inspected: frames wait for inspection.

        Its decisions' latency is queueing anyway, so the writer may gather a larger group
        (fewer fsyncs, less CPU per frame). A live camera never waits for this.
        """
        return not self.config.live_camera and self.capture.queued > 0

    def _linger(self, have: int) -> list[_Decided]:
        """Up to BACKLOG_LINGER_S more for decisions to fill the group (file replay only).

        Polls the queue's length every few ms rather than waking for each decision: one
        wake-up per poll instead of two thread switches per frame.
        """
        deadline = time.monotonic() + BACKLOG_LINGER_S
        while have + self._decided.qsize() < MAX_GROUP and time.monotonic() < deadline:
            if self.stop_event.wait(LINGER_POLL_S):
                break
        return self._take(timeout=0, limit=MAX_GROUP - have)

    def _commit_and_report(
        self,
        buffer: Buffer,
        items: list[_Decided],
        samples: list[SampleRecord],
        events: list[tuple[str, dict[str, Any]]],
        meta: dict[str, str] | None,
    ) -> list[tuple[int, _Decided]] | None:
        """Commit decisions (with earlier decisions' samples, events, meta) in one transaction, then report.

        Returns the committed decisions that want a sample, with their seqs; None when
        stopping while the buffer could not be written (nothing was reported).
        """
        t_rec = time.perf_counter()
        seqs = self._commit(buffer, [item.rec for item in items], samples, events, meta)
        if seqs is None:
            return None
        record_ms = (time.perf_counter() - t_rec) * 1000.0
        self.counts["samples"] += len(samples)
        self.counts["samples_refused"] = buffer.samples_refused
        now = time.time()
        for item, seq in zip(items, seqs, strict=True):
            r = item.rec
            decision = Decision(
                seq, int(r.part_id or 0), item.frame_ts, r.label, r.score, r.passed, r.model_version,
                (now - item.frame_ts) * 1000.0, r.box,
            )  # fmt: skip
            self._report(decision, record_ms)
            if self.metrics is not None:
                self.metrics.observe(r.invoke_ms, decision.latency_ms)
            if not r.passed and item.image is not None and self.last_failure is not None:
                self.last_failure.set(item.image, origin=item.origin, info=_decision_info(decision))
        if items and self.echo is not None:
            self.echo.flush()  # once per group: the lines are already in order
        return [(seq, item) for item, seq in zip(items, seqs, strict=True) if item.sample_reason is not None]

    def _encode(self, committed: list[tuple[int, _Decided]]) -> list[SampleRecord]:
        """JPEG samples of committed decisions (a failed encoding loses the sample, never the decision)."""
        out = []
        for seq, item in committed:
            sample = self._sample(item, seq)
            if sample is not None:
                out.append(sample)
        return out

    def _report(self, decision: Decision, record_ms: float) -> None:
        """A committed decision: counters, operator page, echo stream."""
        self.last = decision
        self.counts["results"] += 1
        self.counts["passed" if decision.passed else "failed"] += 1
        if self.first_decision_at is None:
            self.first_decision_at = time.time()
            logger.info("first decision %.2f s after start", self.first_decision_at - self.started_at)
        if self.echo is not None:
            self.echo.write(
                json.dumps(
                    {"seq": decision.seq, "part_id": decision.part_id, "label": decision.label, "score": round(decision.score, 4),
                     "passed": decision.passed, "model_version": decision.model_version,
                     "latency_ms": round(decision.latency_ms, 3), "record_ms": round(record_ms, 3)}
                )
                + "\n"
            )

    def _sample(self, item: _Decided, result_seq: int) -> SampleRecord | None:
        """The JPEG sample the sampler asked for with this decision."""
        if item.image is None or item.sample_reason is None:
            return None
        r = item.rec
        # Drawn only here, on a sample actually kept: the outline costs nothing on other parts.
        box = r.box if not r.passed and self.config.sampling.draw_box else None
        try:
            jpeg, w, h = self.sampler.encode(item.image, box, item.origin)
        except Exception as exc:  # noqa: BLE001 - a sample is a nice-to-have, the decision is kept
            self.counts["sample_errors"] += 1
            logger.warning("sample for part at %s not kept: %s", item.frame_ts, exc)
            return None
        return SampleRecord(
            ts=item.frame_ts, reason=item.sample_reason, label=r.label, score=r.score, width=w, height=h, jpeg=jpeg,
            result_seq=result_seq,
        )

    def _commit(
        self,
        buffer: Buffer,
        recs: list[ResultRecord],
        samples: list[SampleRecord],
        events: list[tuple[str, dict[str, Any]]],
        meta: dict[str, str] | None,
    ) -> list[int] | None:
        """Commit in one transaction, retrying while the disk is full or the file is locked.

        Nothing is reported until the commit succeeds; meanwhile the decided queue fills,
        inspection waits, a live camera drops its oldest frames (counted) and a file source
        waits, so no decision is lost or invented and memory stays bounded. Once writable
        again, a ``buffer_unwritable`` event records how long it lasted.
        """
        delay = 0.25
        while True:
            try:
                seqs = buffer.record_results(recs, prior_samples=samples, events=events, meta=meta)
            except BufferStoreError as exc:
                if self.buffer_error is None:
                    self.buffer_error_since = time.time()
                    logger.error(
                        "cannot record decisions: %s; retrying until it can. Decisions are held, not lost:"
                        " a file source waits, a live camera drops its oldest frames (counted in status)", exc,
                    )
                self.buffer_error = str(exc)
                if self.stop_event.wait(delay):
                    return None
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self.buffer_error is not None:
                since = self.buffer_error_since or time.time()
                logger.warning("buffer writable again after %.1f s", time.time() - since)
                self.note_event("buffer_unwritable", error=self.buffer_error, since=since, seconds=round(time.time() - since, 3))
                self.buffer_error = self.buffer_error_since = None
            return seqs

    # -- watchdog and status ---------------------------------------------------------------

    def _watchdog_main(self) -> None:
        # Normal priority: a capture thread it restarts inherits this thread's nice value.
        limit = self.config.camera.watchdog_s
        while not self.stop_event.wait(STATUS_INTERVAL_S):
            cam = self.capture.state()
            if cam.state == "up" and self.config.live_camera and time.monotonic() - self.capture.last_progress > limit:
                logger.warning("camera gave no frame for %.0f s; restarting capture", limit)
                self.note_event("capture_restarted", seconds=limit)
                self.capture.restart()
            if self.sync is not None:
                try:
                    self.sync.check()
                except OSError as exc:
                    logger.warning("sync process not restarted: %s", exc)

    def _status_main(self) -> None:
        nice_this_thread()  # status work must never take a core from inspection
        reader: Buffer | None = None
        try:
            while not self.stop_event.is_set():
                self._status_due.wait(STATUS_INTERVAL_S)
                self._status_due.clear()
                if self.stop_event.is_set():
                    break
                reader = self._refresh_stats(reader)
                self._write_status_file(state="running")
        finally:
            if reader is not None:
                reader.close()

    def _refresh_stats(self, reader: Buffer | None) -> Buffer | None:
        """Buffer counts for status, read on this thread's own connection.

        Counting rows takes time on a large buffer: here it never delays a commit.
        """
        try:
            if reader is None:
                reader = Buffer.open_readonly(self.config.buffer.path)
            stats = reader.stats()
        except BufferStoreError as exc:
            logger.debug("buffer stats not refreshed: %s", exc)
            if reader is not None:
                reader.close()
            return None
        ck = self._checkpointer_stats
        if ck is not None:
            stats["checkpoints"] = ck()
        self.buffer_stats = stats
        return reader

    def status_snapshot(self) -> dict[str, Any]:
        """Live state for the status file and the sync client's status messages."""
        cam = self.capture.state()
        stats = getattr(self, "buffer_stats", {}) or {}
        last = self.last
        return {
            "device_id": self.config.device_id,
            "line": self.config.line,
            "groups": list(self.config.groups),
            "pid": os.getpid(),
            "started": self.started_at,
            "updated": time.time(),
            "model_version": self.classifier.version,
            "model_name": self.classifier.manifest.name,
            "runtime": self.classifier.runtime,
            "camera": {
                "state": cam.state,
                "source": cam.source,
                "since": cam.since,
                "down_since": cam.down_since,
                "reconnects": cam.reconnects,
                "frames": cam.frames,
                "dropped": cam.dropped,
                "bad_frames": cam.bad_frames,
                "fps": cam.fps,
                "last_error": cam.last_error,
            },
            "session": dict(self.counts),
            "unsynced": stats.get("unsynced"),
            "buffer_error": self.buffer_error,
            "buffer_error_since": self.buffer_error_since,
            "decisions_waiting": self._decided.qsize(),
            "buffer_bytes": stats.get("bytes_used"),
            "evictions": stats.get("evictions"),
            "drift": self.drift.snapshot(),
            "last_decision": None if last is None else {**_decision_info(last), "latency_ms": last.latency_ms},
            # the operator page's last failed part (its picture: GET /api/last-fail.jpg)
            "last_failure": None if self.last_failure is None else self.last_failure.info(),
            "ota": {"state": "off", "reason": self.ota_error}
            if self.ota_error
            else None
            if self.ota is None
            else self.ota.state,
            "mqtt_error": self.mqtt_error,
            "sync_process": None if self.sync is None else self.sync.snapshot(),
            "operator_url": None
            if self.operator is None
            else f"http://{self.config.operator.host}:{self.operator.port}/",
            "metrics_url": None
            if self.metrics is None
            else f"http://{self.config.metrics.host}:{self.metrics_port}/metrics",  # type: ignore[union-attr]
            "first_decision_s": None if self.first_decision_at is None else self.first_decision_at - self.started_at,
        }

    def _write_status_file(self, state: str) -> None:
        snap = self.status_snapshot()
        snap["state"] = state
        path = self.config.status_path
        try:
            # Rewritten every few seconds: no fsync, so it never waits beside the buffer's commits.
            atomic_write(path, json.dumps(snap, default=str), durable=False)
        except OSError as exc:  # a full disk must not stop inspection; the buffer has the data
            logger.warning("status file %s not written: %s", path, exc)


def frame_box(box: tuple[int, int, int, int] | None, origin: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A box in the pixels of the picture the model saw -> camera-frame pixels (ROI offset added)."""
    if box is None:
        return None
    x, y, w, h = box
    return (int(x) + origin[0], int(y) + origin[1], int(w), int(h))


def _decision_info(d: Decision) -> dict[str, Any]:
    return {"seq": d.seq, "part_id": d.part_id, "ts": d.ts, "label": d.label, "score": d.score, "passed": d.passed,
            "model_version": d.model_version, "box": None if d.box is None else list(d.box)}  # fmt: skip


def run_agent(config: AgentConfig, *, echo: TextIO | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    agent = Agent(config, echo=echo)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which would otherwise pause inspection to rescan it.
    gc.freeze()
    print(
        f"linewatch agent {config.device_id}: model {agent.classifier.version} ({agent.classifier.runtime}), "
        f"camera {redact_url(str(config.camera.source))}, buffer {config.buffer.path}",
        file=sys.stderr,
        flush=True,
    )
    while not agent.stop_event.wait(0.5):
        pass
    agent.join(timeout=2.0)
    return 0 if agent.fatal is None else 1
