"""The edge agent daemon: start-up, the inspection loop, the watchdog and shutdown.

Threads (one stop Event shared by all; every loop notices it within a second):

    capture     camera -> bounded queue            (edge.capture.Capture)
    inspect     queue -> model -> SQLite commit    (this module; never touches the network)
    sync        SQLite outbox -> MQTT              (edge.sync.SyncClient, optional)
    watchdog    restarts a stuck capture, writes the live status file

Shutdown (SIGTERM/SIGINT) stops them in reverse order of dependency: capture stops
producing, inspection finishes the frame in flight and commits it, sync flushes, the
buffer closes. A decision is reported (``--echo``, status, MQTT) only after its commit.
"""

from __future__ import annotations

import json
import logging
import os
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

from edge.buffer import Buffer, ResultRecord, SampleRecord
from edge.capture import CameraState, Capture, Frame, open_source, parse_source
from edge.config import AgentConfig
from edge.exceptions import BufferStoreError
from edge.inference import Classifier, Prediction
from edge.models import ModelStore

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0
MAX_GROUP = 16  # decisions committed together when a backlog is waiting


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


class Sampler:
    """Chooses which frames are kept as JPEG samples, within hourly budgets."""

    def __init__(self, config: AgentConfig, threshold: Callable[[], float], seed: int | None = None) -> None:
        self.cfg = config.sampling
        self._threshold = threshold
        self._rng = random.Random(seed)
        self._hour = -1
        self._taken = 0
        self._reservoir_taken = 0

    def reason(self, pred: Prediction, now: float) -> str | None:
        hour = int(now // 3600)
        if hour != self._hour:
            self._hour, self._taken, self._reservoir_taken = hour, 0, 0
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

    def encode(self, image: np.ndarray) -> tuple[bytes, int, int]:
        h, w = image.shape[:2]
        scale = min(1.0, self.cfg.max_side / max(h, w))
        if scale < 1.0:
            image = cv2.resize(image, (max(1, int(w * scale)), max(1, int(h * scale))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return buf.tobytes(), image.shape[1], image.shape[0]


class Agent:
    """One inspection station: build with a config, ``start()``, later ``stop()`` and ``join()``."""

    def __init__(self, config: AgentConfig, *, echo: TextIO | None = None) -> None:
        self.config = config
        self.stop_event = threading.Event()
        self.echo = echo
        self.models = ModelStore(config.model.path)
        self.classifier = self._load_classifier(self.models.current())
        self._next_classifier: Classifier | None = None
        self._swap_lock = threading.Lock()
        spec = parse_source(config.camera.source)
        self.capture = Capture(
            lambda: open_source(spec, fps=config.camera.fps, loop=config.camera.loop),
            source=str(config.camera.source),
            maxsize=config.camera.queue_size,
            backpressure=not config.live_camera,
            on_state_change=self._on_camera_change,
        )
        self.sampler = Sampler(config, lambda: self.classifier.manifest.threshold)
        self.started_at = time.time()
        self.first_decision_at: float | None = None
        self.counts = {"results": 0, "passed": 0, "failed": 0, "samples": 0, "errors": 0}
        self.last: Decision | None = None
        self._events: list[tuple[str, dict[str, Any]]] = []  # recorded by the inspect thread
        self._events_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.sync: Any = None
        self.operator: Any = None
        self.ota: Any = None
        self.buffer_error: str | None = None
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
        """Queue an event for the inspection thread to write (it owns the buffer connection)."""
        with self._events_lock:
            self._events.append((kind, detail))

    def _on_camera_change(self, old: CameraState, new: CameraState) -> None:
        if new.state in ("up", "down", "ended"):
            self.note_event(f"camera_{new.state}", source=new.source, error=new.last_error, reconnects=new.reconnects)

    # -- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        self._buffer_ready = threading.Event()
        inspect = threading.Thread(target=self._inspect_main, name="inspect", daemon=True)
        inspect.start()
        # The buffer is opened (and recovered if corrupt) before capture starts producing.
        self._buffer_ready.wait(30)
        if self.fatal:
            raise self.fatal
        self.capture.start()
        watchdog = threading.Thread(target=self._watchdog_main, name="watchdog", daemon=True)
        watchdog.start()
        self._threads = [inspect, watchdog]
        if self.config.mqtt.enabled:
            self._start_sync()
            self._start_ota()
        if self.config.operator.enabled:
            self._start_operator_page()

    def _start_ota(self) -> None:
        from edge.ota import OtaClient

        self.ota = OtaClient(self.config, self)
        self.ota.start()

    def _start_operator_page(self) -> None:
        from edge.operator import OperatorPage

        op = self.config.operator
        try:
            self.operator = OperatorPage(op.host, op.port, self.status_snapshot, self.config.buffer.path)
        except OSError as exc:  # a taken port must not stop the line
            logger.warning("operator page not started on %s:%s (%s); inspection continues", op.host, op.port, exc)
            return
        self.operator.start()

    def _start_sync(self) -> None:
        try:
            from edge.sync import SyncClient
        except ImportError as exc:  # pragma: no cover - the edge extra brings paho
            logger.warning("sync disabled: %s", exc)
            return
        self.sync = SyncClient(self.config, status=self.status_snapshot)
        self.sync.start()

    def stop(self) -> None:
        self.stop_event.set()

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
        self._write_status_file(state="stopped")

    # -- inspection ------------------------------------------------------------------------

    def _inspect_main(self) -> None:
        cfg = self.config
        try:
            buffer = Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, synchronous=cfg.buffer.synchronous, device_id=cfg.device_id)
        except BaseException as exc:
            self.fatal = exc
            self._buffer_ready.set()
            self.stop_event.set()
            return
        with buffer:
            self.buffer_stats = buffer.stats()
            self.counts["results"] = self.buffer_stats.get("results", 0)
            self.counts["passed"] = self.buffer_stats.get("passed", 0)
            self.counts["failed"] = self.buffer_stats.get("failed", 0)
            buffer.record_event("start", pid=os.getpid(), model_version=self.classifier.version, runtime=self.classifier.runtime)
            buffer.record_event("model_loaded", version=self.classifier.version, path=str(self.classifier.bundle_dir))
            self._buffer_ready.set()
            part_id = int(buffer.meta_get("last_part_id") or 0)
            last_stats = 0.0
            while not self.stop_event.is_set():
                try:
                    self._flush_events(buffer)
                    self._maybe_swap(buffer)
                    frame = self.capture.get(timeout=0.2)
                    if frame is None:
                        continue
                    part_id = self._inspect_batch(buffer, frame, part_id)
                    now = time.monotonic()
                    if now - last_stats >= STATUS_INTERVAL_S:
                        self.buffer_stats = buffer.stats()
                        buffer.meta_set("last_part_id", str(part_id))
                        last_stats = now
                except Exception as exc:  # noqa: BLE001 - the inspection thread must outlive any one failure
                    self.counts["errors"] += 1
                    logger.exception("inspection loop error (continuing): %s", exc)
                    self.stop_event.wait(1.0)
            # Frames already captured are drained only for finite sources (nothing is lost by
            # stopping a live camera; a file replay resumes nowhere anyway).
            try:
                self._flush_events(buffer)
                buffer.meta_set("last_part_id", str(part_id))
                buffer.record_event("stop", results=self.counts["results"])
                self.buffer_stats = buffer.stats()
            except BufferStoreError as exc:  # every decision is already committed
                logger.error("stop event not recorded: %s", exc)

    def _maybe_swap(self, buffer: Buffer) -> None:
        with self._swap_lock:
            nxt, self._next_classifier = self._next_classifier, None
        if nxt is not None:
            old = self.classifier
            self.classifier = nxt
            buffer.record_event("model_switched", old=old.version, new=nxt.version)
            logger.info("model switched %s -> %s", old.version, nxt.version)

    def _inspect_batch(self, buffer: Buffer, first: Frame, part_id: int) -> int:
        """Decide ``first`` and any frames already waiting, commit them together, then report.

        Adaptive group commit: a paced camera leaves the queue empty, so each decision is
        committed alone (lowest latency); a backlog is committed in groups of up to
        MAX_GROUP (one fsync for several decisions). Nothing is reported before its commit.
        Returns the last part id used.
        """
        decided: list[tuple[Frame, np.ndarray, Prediction, ResultRecord]] = []
        frame: Frame | None = first
        while frame is not None:
            part_id += 1
            item = self._decide(buffer, frame, part_id)
            if item is not None:
                decided.append(item)
            frame = self.capture.get(timeout=0) if len(decided) < MAX_GROUP else None
        if not decided:
            return part_id
        samples = {}
        for i, (frame, image, pred, _) in enumerate(decided):
            sample = self._sample(frame, image, pred)
            if sample is not None:
                samples[i] = sample
        t_rec = time.perf_counter()
        seqs = self._commit(buffer, [rec for _, _, _, rec in decided], samples)
        if seqs is None:
            return part_id  # stopping while the buffer could not be written: nothing was reported
        record_ms = (time.perf_counter() - t_rec) * 1000.0
        self.counts["samples"] += len(samples)
        now = time.time()
        for (frame, _image, pred, rec), seq in zip(decided, seqs, strict=True):
            self._report(Decision(seq, int(rec.part_id or 0), frame.ts, pred.label, pred.score, pred.passed, rec.model_version, (now - frame.ts) * 1000.0), record_ms)
        if self.echo is not None:
            self.echo.flush()  # once per group: the lines are already in order
        return part_id

    def _decide(self, buffer: Buffer, frame: Frame, part_id: int) -> tuple[Frame, np.ndarray, Prediction, ResultRecord] | None:
        clf = self.classifier
        image = frame.image
        roi = self.config.camera.roi
        if roi is not None:
            x, y, w, h = roi
            image = image[y : y + h, x : x + w]
        try:
            if image.size == 0:
                raise ValueError(f"camera.roi {list(roi or ())} lies outside the {frame.image.shape[1]}x{frame.image.shape[0]} frame")
            pred = clf.predict(image)
            if self.ota is not None:
                self.ota.observe(pred, clf.version)  # health watch after a model switch
        except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the line
            if self.ota is not None:
                self.ota.observe_error(exc, clf.version)
            self.counts["errors"] += 1
            logger.warning("frame %s could not be decided: %s", frame.index, exc)
            buffer.record_event("inference_error", frame=frame.index, error=str(exc)[:500])
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
        )
        return frame, image, pred, rec

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

    def _sample(self, frame: Frame, image: np.ndarray, pred: Prediction) -> SampleRecord | None:
        """The JPEG sample to keep with this decision, if the sampler wants one."""
        why = self.sampler.reason(pred, frame.ts)
        if not why:
            return None
        try:
            jpeg, w, h = self.sampler.encode(image)
        except Exception as exc:  # noqa: BLE001 - a sample is a nice-to-have, the decision is kept
            logger.warning("sample for part at %s not kept: %s", frame.ts, exc)
            return None
        return SampleRecord(ts=frame.ts, reason=why, label=pred.label, score=pred.score, width=w, height=h, jpeg=jpeg)

    def _commit(self, buffer: Buffer, recs: list[ResultRecord], samples: dict[int, SampleRecord]) -> list[int] | None:
        """Commit decisions in one transaction, retrying while the disk is full or the file is locked.

        Nothing is reported until the commit succeeds; meanwhile a live camera drops
        frames (counted) and a file source waits, so no decision is lost or invented.
        """
        delay = 0.5
        while True:
            try:
                seqs = buffer.record_results(recs, samples)
                if self.buffer_error is not None:
                    logger.warning("buffer writable again")
                    self.buffer_error = None
                return seqs
            except BufferStoreError as exc:
                if self.buffer_error is None:
                    logger.error("cannot record decisions: %s; retrying (free disk space or fix permissions)", exc)
                self.buffer_error = str(exc)
                if self.stop_event.wait(delay):
                    return None
                delay = min(delay * 2, 5.0)

    def _flush_events(self, buffer: Buffer) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        for kind, detail in events:
            buffer.record_event(kind, **detail)

    # -- watchdog and status ---------------------------------------------------------------

    def _watchdog_main(self) -> None:
        limit = self.config.camera.watchdog_s
        while not self.stop_event.wait(STATUS_INTERVAL_S):
            cam = self.capture.state()
            if cam.state == "up" and self.config.live_camera and time.monotonic() - self.capture.last_progress > limit:
                logger.warning("camera gave no frame for %.0f s; restarting capture", limit)
                self.note_event("capture_restarted", seconds=limit)
                self.capture.restart()
            self._write_status_file(state="running")

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
            "buffer_bytes": stats.get("bytes_used"),
            "evictions": stats.get("evictions"),
            "last_decision": None
            if last is None
            else {"seq": last.seq, "part_id": last.part_id, "ts": last.ts, "label": last.label, "score": last.score,
                  "passed": last.passed, "latency_ms": last.latency_ms},
            "ota": None if self.ota is None else self.ota.state,
            "operator_url": None if self.operator is None else f"http://{self.config.operator.host}:{self.operator.port}/",
            "first_decision_s": None if self.first_decision_at is None else self.first_decision_at - self.started_at,
        }

    def _write_status_file(self, state: str) -> None:
        snap = self.status_snapshot()
        snap["state"] = state
        path = self.config.status_path
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(snap, default=str))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk must not stop inspection; the buffer has the data
            logger.warning("status file %s not written: %s", path, exc)


def run_agent(config: AgentConfig, *, echo: TextIO | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    agent = Agent(config, echo=echo)

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    print(
        f"linewatch agent {config.device_id}: model {agent.classifier.version} ({agent.classifier.runtime}), "
        f"camera {config.camera.source}, buffer {config.buffer.path}",
        file=sys.stderr,
        flush=True,
    )
    while not agent.stop_event.wait(0.5):
        pass
    agent.join(timeout=2.0)
    return 0 if agent.fatal is None else 1
