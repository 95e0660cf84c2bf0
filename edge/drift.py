"""Drift on the box: does the line still look like it did when this model went live?

Per frame, on a few thousand of its pixels (the cost: docs/benchmarks.md, "Drift"):

    brightness    mean grey level of a strided subsample (every ``stride``-th pixel and row
                  of a 640x480 frame; larger frames are subsampled further, to as many pixels)
    contrast      standard deviation of the same pixels
    histogram     16-bin grey histogram of the same pixels (the manifest reference's bins)
    sharpness     variance of the Laplacian on a central crop at full resolution, divided by
                  the crop's squared mean brightness (a blur spreads edges over pixels and a downscaled
                  copy would hide a 2-pixel blur; the division keeps a dimmer lamp from
                  reading as a blur)

Per part: the model's defect score, whether it failed, whether it lay near the threshold.

What ``observe`` does per part is copy the pixels these measures read (the subsample and the
crop: 14 KB of a 640x480 frame) into a batch. The batch's frames are measured together, each
on its own pixels as above, when the end of the baseline or a check is due, or when the
batch is full (``check_every`` parts, 64 at most): a frame measured alone, between a video
decode and a model invoke, finds the measures' code and buffers cold in the caches at every
call; in a batch only the first frame does. A ``deferred`` monitor (the agent's) leaves the
measuring and the checks to ``update``, which the agent's writer calls after each commit,
so no decision waits for them.

The anchor is the *line's baseline*: the first ``baseline_parts`` parts decided by this
model on this box, kept in the buffer's meta table so a restart does not relearn it from
a line that may have drifted meanwhile. The manifest's reference statistics (training
pixels) are compared with that baseline and reported as ``vs_training`` (how far the line
was from the training pictures to begin with); they are not the anchor, because a line's
frames legitimately differ from curated training crops (belt, framing, ROI) and such a
comparison would alarm forever. A bundle without reference statistics (older trainer)
runs with the checks off, and the status says so.

Every ``check_every`` parts the last ``window_parts`` parts are compared with the baseline:

    brightness, contrast, sharpness, score   two-sample Kolmogorov-Smirnov statistic D
    histogram                                population stability index (PSI), limits no lower
                                             than the line's own window-to-window noise
    fail_rate, near_threshold                two-proportion z test

Each measure gets a level (0 ok, 1 warning, 2 drift) from both a significance limit and a
minimum size of change (a statistically sure 2 % change is not worth a line stop). The
state rises to a level only after ``persist_checks`` consecutive checks at or above it and
falls back only after ``clear_checks`` consecutive checks below it (hysteresis): one odd
part cannot raise it, one good part cannot clear it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

STATES = ("ok", "warning", "drift")
HIST_BINS = 16  # the trainer's PIXEL_BINS: 16 bins over 0..255
SHARP_CROP = (192, 48)  # central crop (width, height) for the Laplacian, full resolution
BATCH_LIMIT = 64  # most parts whose pixels wait for their measures
PSI_EPS = 1e-4  # floor of a bin's share, so an empty bin does not make PSI infinite
BASELINE_META_KEY = "drift_baseline"
SCALARS = ("brightness", "contrast", "sharpness", "score")
COLUMNS = (*SCALARS, "failed", "near")  # one row per part in the baseline and the window
MEASURES = (*SCALARS, "histogram", "fail_rate", "near_threshold")

# Limits per level (warning, drift). KS: D must beat the critical value at ``alpha`` and
# the minimum D; scalars also need the medians to differ by the relative change given.
KS_ALPHA = (1e-3, 1e-6)
KS_MIN_D = (0.3, 0.5)
MIN_RELATIVE_CHANGE = {"brightness": (0.06, 0.10), "contrast": (0.10, 0.15), "sharpness": (0.20, 0.30), "score": (0.0, 0.0)}
PSI_LIMITS = (0.1, 0.25)  # the usual PSI bands: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted
PROPORTION_Z = (3.5, 5.0)
PROPORTION_MIN_CHANGE = (0.05, 0.10)

# What an operator reads, per measure and direction. "usual": this model's first parts.
ADVICE = {
    ("brightness", -1): "images darker than usual: check the lighting (lamp, shutter, something shading the part)",
    ("brightness", 1): "images brighter than usual: check for stray light or a changed camera exposure",
    ("contrast", -1): "images flatter than usual: check the lighting and the lens for fog or dirt",
    ("contrast", 1): "images harsher than usual: check the lighting, or a new surface finish on the parts",
    ("sharpness", -1): "images blurrier than usual: clean the lens, check the focus and the camera mount",
    ("sharpness", 1): "images busier than usual: a new surface texture or finish? check the parts' supplier",
    ("histogram", 0): "pixel values unlike usual: check the lighting, the camera settings and the parts",
    ("score", 0): "the model's scores have shifted: the parts or the picture changed; check the samples",
    ("fail_rate", 1): "more parts fail than usual: check real parts by hand before trusting the verdicts",
    ("fail_rate", -1): "fewer parts fail than usual: check that defects are still caught (test parts)",
    ("near_threshold", 1): "more borderline parts than usual: the model is unsure; samples are being kept for labelling",
    ("near_threshold", -1): "fewer borderline parts than usual: the parts or the picture changed; check the samples",
}


@dataclass(frozen=True)
class DriftSettings:
    """Windows and limits (from the agent config's ``[drift]`` section)."""

    enabled: bool = True
    baseline_parts: int = 500
    window_parts: int = 200
    check_every: int = 25
    persist_checks: int = 3
    clear_checks: int = 6
    stride: int = 8
    near_margin: float = 0.1
    samples_per_hour: int = 60


@dataclass(frozen=True)
class FrameStats:
    """One frame's picture measures."""

    brightness: float
    contrast: float
    sharpness: float
    histogram: np.ndarray  # HIST_BINS counts


def frame_stats(image: np.ndarray, stride: int = 8) -> FrameStats:
    """The picture measures of one frame (uint8 gray, BGR or BGRA), on a subsample.

    Colour frames are measured on their green channel: it carries most of the luma
    weight (0.59) and needs no colour conversion, which would cost more than the rest.
    """
    sub_at, crop_at = _pixels_read(image.shape, stride)
    return FrameStats(*_picture_measures(np.ascontiguousarray(image[sub_at]), np.ascontiguousarray(image[crop_at])))


def _pixels_read(shape: tuple[int, ...], stride: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Where a frame of ``shape`` keeps the subsample and the sharpness crop (index tuples)."""
    h, w = shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"empty frame {tuple(shape)}")
    channel = () if len(shape) == 2 else (0 if shape[2] == 1 else 1,)  # gray, or green of BGR/BGRA
    # ``stride`` is for 640x480: a larger frame is subsampled further, to about as many pixels
    step = max(1, round(stride * math.sqrt(h * w / (640 * 480)))) if h * w > 640 * 480 else stride
    cw, ch = min(w, SHARP_CROP[0]), min(h, SHARP_CROP[1])
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return (slice(None, None, step), slice(None, None, step), *channel), (slice(y0, y0 + ch), slice(x0, x0 + cw), *channel)


def _picture_measures(sub: np.ndarray, crop: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Brightness, contrast, sharpness and histogram from a frame's subsample and crop (contiguous uint8)."""
    mean, std = cv2.meanStdDev(sub)
    hist = cv2.calcHist([sub], [0], None, [HIST_BINS], [0, 256]).ravel()
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(crop, cv2.CV_16S))
    crop_mean = cv2.mean(crop)[0]
    # Laplacian variance over the crop's squared mean: a dimmer lamp scales both by the
    # same factor, so only a change in fine detail (blur, a new texture) moves it.
    sharpness = 1e4 * float(lap_std[0, 0]) ** 2 / max(crop_mean * crop_mean, 1.0)
    return float(mean[0, 0]), float(std[0, 0]), sharpness, hist


class PixelBatch:
    """The pixels the picture measures read, copied from up to ``capacity`` frames of one shape."""

    def __init__(self, shape: tuple[int, ...], stride: int, capacity: int) -> None:
        self.shape, self.capacity = shape, capacity
        self._sub_at, self._crop_at = _pixels_read(shape, stride)
        probe = np.empty(shape[:2], np.uint8)  # the two regions' shapes, without a frame at hand
        self._subs = np.empty((capacity, *probe[self._sub_at[:2]].shape), np.uint8)
        self._crops = np.empty((capacity, *probe[self._crop_at[:2]].shape), np.uint8)
        self._parts = np.empty((capacity, 3), np.float64)  # score, failed, near

    def put(self, slot: int, image: np.ndarray, score: float, failed: bool, near: bool) -> None:
        """Copy one frame's measured pixels (two small strided copies: all a part costs at once)."""
        if image.dtype != np.uint8:
            raise ValueError(f"frame of {image.dtype}, not uint8")
        self._subs[slot] = image[self._sub_at]
        self._crops[slot] = image[self._crop_at]
        self._parts[slot] = (score, failed, near)

    def measures(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` parts as rows in COLUMNS order, and their HIST_BINS histograms."""
        rows = np.empty((n, len(COLUMNS)), np.float64)
        hists = np.empty((n, HIST_BINS), np.float64)
        for i in range(n):
            brightness, contrast, sharpness, hists[i] = _picture_measures(self._subs[i], self._crops[i])
            rows[i, :3] = brightness, contrast, math.log1p(sharpness)
        rows[:, 3:] = self._parts[:n]
        return rows, hists


# -- the tests ------------------------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray, *, presorted: bool = False) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs."""
    if not presorted:
        a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_critical(n: int, m: int, alpha: float) -> float:
    """D above which two samples of sizes n and m differ at level ``alpha`` (asymptotic)."""
    return math.sqrt(-0.5 * math.log(alpha / 2.0)) * math.sqrt((n + m) / (n * m))


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two histograms (counts or shares, same bins)."""
    return float(psi_rows(np.asarray(actual, dtype=np.float64)[None], expected)[0])


def psi_rows(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """PSI of each row of ``actual`` (histograms, one per row) against ``expected``."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    a = np.maximum(a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12), PSI_EPS)
    e = np.maximum(e / max(e.sum(), 1e-12), PSI_EPS)
    return np.sum((a - e) * np.log(a / e), axis=-1)


def proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z of the difference of two proportions k1/n1 - k2/n2 (pooled standard error)."""
    p = (k1 + k2) / max(1, n1 + n2)
    se = math.sqrt(max(p * (1 - p), 1e-9) * (1 / max(1, n1) + 1 / max(1, n2)))
    return (k1 / max(1, n1) - k2 / max(1, n2)) / se


def has_reference(reference: dict[str, Any]) -> bool:
    """The manifest carries the input histogram the checks need (trainers since the first bundle schema)."""
    try:
        fractions = reference["input"]["histogram"]["fraction"]
    except (KeyError, TypeError):
        return False
    return isinstance(fractions, list) and len(fractions) == HIST_BINS


# -- the monitor ----------------------------------------------------------------------------


class DriftMonitor:
    """Rolling statistics of one model's parts, compared with its baseline; thread-safe reads.

    ``observe`` runs on the inspection thread for every decided part; ``update`` (the writer,
    for a ``deferred`` monitor), ``snapshot`` (status), ``take_events`` and
    ``take_baseline_record`` (the writer) may be called from others. The counts in the
    snapshot are of measured parts: up to a batch behind the decided ones.
    """

    def __init__(self, settings: DriftSettings, *, model_version: str, model_sha256: str, threshold: float,
                 reference: dict[str, Any], deferred: bool = False) -> None:
        self.settings = settings
        self.deferred = deferred
        self._lock = threading.Lock()  # the statistics and the batch being filled
        self._flush_lock = threading.Lock()  # one batch measured at a time, in order
        self._capacity = max(1, min(settings.check_every, BATCH_LIMIT))
        self._batch: PixelBatch | None = None
        self._spare: PixelBatch | None = None
        self._generation = 0
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._baseline_record: str | None = None
        self.errors = 0
        self.reset(model_version=model_version, model_sha256=model_sha256, threshold=threshold, reference=reference)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy (benchmarks/drift.py): the lock is not copied
        state = dict(self.__dict__)
        del state["_lock"], state["_flush_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._flush_lock = threading.Lock(), threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def reset(self, *, model_version: str, model_sha256: str, threshold: float, reference: dict[str, Any],
              why: str | None = None) -> None:
        """A new model went live: its reference replaces the old one and statistics restart."""
        s = self.settings
        with self._lock:
            previous = getattr(self, "state", "ok")
            self.model_version, self.model_sha256, self.threshold = model_version, model_sha256, threshold
            self.reference = reference
            self.note: str | None = None
            if not s.enabled:
                self.checks, self.note = "off", "drift checks are off (drift.enabled = false in the agent config)"
            elif not has_reference(reference):
                self.checks = "off"
                self.note = ("this model bundle has no reference statistics (made by an older trainer):"
                             " drift checks are off; retrain or re-export it to turn them on")
            else:
                self.checks = "baseline"
            self.state = "ok"
            self._level = 0
            self._above = [0, 0, 0]  # consecutive checks with raw level >= index
            self._below = [0, 0, 0]  # consecutive checks with raw level <= index
            self._base: dict[str, list[float]] = {k: [] for k in COLUMNS}
            self._base_hist = np.zeros(HIST_BINS, np.float64)
            self._base_frame_hists: list[np.ndarray] = []
            self._psi_limits = PSI_LIMITS
            # The window as ring buffers (a row per part): a check reads them without copying deques.
            self._win = np.zeros((s.window_parts, len(COLUMNS)), np.float64)
            self._win_hist = np.zeros((s.window_parts, HIST_BINS), np.float64)
            self._parts = 0
            self._since_check = 0
            self._levels: dict[str, int] = {}
            self._measures: dict[str, Any] = {}
            self._vs_training: dict[str, Any] | None = None
            self._out_of_band: tuple[str, ...] = ()
            self._since = time.time()
            self._pending = 0  # parts in the batch, not yet measured (the old model's are dropped)
            self._generation += 1
            self._due = self._next_due()
            if previous != "ok" and why:
                self._events.append(("drift_state", {"state": "ok", "previous": previous, "why": why,
                                                     "model_version": model_version}))

    def restore(self, record: str | None) -> bool:
        """Reload a baseline kept in the buffer (same model, same settings); False when none fits."""
        if not record or self.checks != "baseline":
            return False
        try:
            data = json.loads(record)
            if data.get("model_sha256") != self.model_sha256 or int(data.get("stride", -1)) != self.settings.stride:
                return False
            base = {k: [float(v) for v in data["values"][k]] for k in (*SCALARS, "failed", "near")}
            hists = np.asarray(data["histograms"], dtype=np.float64)
            if hists.shape != (len(base["score"]), HIST_BINS) or len({len(v) for v in base.values()}) != 1 or not base["score"]:
                return False
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("stored drift baseline not usable (%s); learning a new one", exc)
            return False
        with self._lock:
            self._base, self._base_frame_hists, self._base_hist = base, list(hists), hists.sum(axis=0)
            self._finish_baseline(store=False)
            self._due = self._next_due()
        logger.info("drift baseline of model %s restored (%d parts)", self.model_version, len(base["score"]))
        return True

    # -- per part ------------------------------------------------------------------------

    def observe(self, image: np.ndarray, score: float, passed: bool) -> None:
        """Take one decided part (its picture as the model saw it). Never raises.

        Copies the pixels its measures read into the batch. When a check or the end of the
        baseline is due, the batch is measured and accounted here; a ``deferred`` monitor
        leaves that to ``update`` and does it here only when its batch is full.
        """
        if self.checks == "off":
            return
        try:
            near = abs(score - self.threshold) <= self.settings.near_margin
            while True:
                with self._lock:
                    batch = self._batch
                    if batch is not None and batch.shape == image.shape and self._pending < batch.capacity:
                        batch.put(self._pending, image, score, not passed, near)
                        self._pending += 1
                        break
                    if not self._pending:  # a first frame, or a new frame size
                        self._batch, self._spare = PixelBatch(image.shape, self.settings.stride, self._capacity), None
                        continue
                self._flush()  # the full batch, or the frames of the old size, first
            if not self.deferred and self._pending >= self._due:
                self._flush()
        except Exception as exc:  # noqa: BLE001 - drift is advice; the decision must go on
            self._skipped(exc, 1)

    def update(self) -> None:
        """Measure the waiting parts and run the check if one is due; cheap when none is. Never raises."""
        if self._pending < self._due:
            return
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001 - drift is advice
            self._skipped(exc, 1)

    def _skipped(self, exc: Exception, parts: int) -> None:
        self.errors += parts
        if self.errors <= 3:
            logger.warning("drift statistics skipped %d part(s): %s", parts, exc)

    def _flush(self) -> None:
        """Measure the batch's parts and account them in order: baseline, window, checks."""
        with self._flush_lock:
            with self._lock:
                n, batch, generation = self._pending, self._batch, self._generation
                if not n or batch is None:
                    return
                # inspection fills the spare meanwhile
                spare = self._spare if self._spare is not None and self._spare.shape == batch.shape else None
                self._batch, self._spare, self._pending = spare, batch, 0
            try:
                rows, hists = batch.measures(n)  # outside the lock: the slow part
            except Exception as exc:  # noqa: BLE001 - a batch whose pixels cannot be measured is skipped
                self._skipped(exc, n)
                return
            with self._lock:
                if generation == self._generation:  # else a new model went live meanwhile: these were the old one's
                    for row, hist in zip(rows, hists, strict=True):
                        self._account(row, hist)
                self._due = self._next_due()

    def _account(self, row: np.ndarray, hist: np.ndarray) -> None:
        s = self.settings
        if self.checks == "baseline":
            for k, v in zip(COLUMNS, row.tolist(), strict=True):
                self._base[k].append(v)
            self._base_hist += hist
            self._base_frame_hists.append(hist)
            if len(self._base["score"]) >= s.baseline_parts:
                self._finish_baseline(store=True)
            return
        slot = self._parts % s.window_parts
        self._win[slot] = row
        self._win_hist[slot] = hist
        self._parts += 1
        self._since_check += 1
        if self._since_check >= s.check_every and self._parts >= s.window_parts:
            self._since_check = 0
            self._check()

    def _next_due(self) -> int:
        """Waiting parts that make a measurement due: the baseline's end, the next check, or a full batch."""
        s = self.settings
        if self.checks == "baseline":
            left = s.baseline_parts - len(self._base["score"])
        else:
            left = max(s.check_every - self._since_check, s.window_parts - self._parts)
        return max(1, min(self._capacity, left))

    def _finish_baseline(self, *, store: bool) -> None:
        self.checks = "on"
        self._base_arrays = {k: np.sort(np.asarray(v, dtype=np.float64)) for k, v in self._base.items()}
        self._base_median = {k: float(v[len(v) // 2]) for k, v in self._base_arrays.items()}
        self._psi_limits = self._calibrate_psi()
        ref = self.reference["input"]
        base_share = self._base_hist / max(1, int(self._base_hist.sum()))
        self._vs_training = {
            "psi": round(psi(base_share, np.asarray(ref["histogram"]["fraction"])), 4),
            "brightness": round(float(np.mean(self._base_arrays["brightness"])), 2),
            "training_brightness": ref.get("pixel_mean"),
        }
        if store:
            self._baseline_record = json.dumps({
                "model_version": self.model_version, "model_sha256": self.model_sha256, "stride": self.settings.stride,
                "created": time.time(), "histograms": [[int(v) for v in h] for h in self._base_frame_hists],
                "values": {k: [round(x, 4) for x in v] for k, v in self._base.items()},
            }, separators=(",", ":"))
        self._since = time.time()

    def _calibrate_psi(self) -> tuple[float, float]:
        """PSI limits no lower than the usual bands, nor than the line's own window-to-window noise.

        Pixels of one frame move together (a brighter part moves them all), so a window of W
        frames is W samples, not W x pixels: windows of the baseline's own frames, drawn at
        random (fixed seed), show how large PSI gets on a line that did not change; the
        limits are 2x and 3x the largest of those.
        """
        frames = np.asarray(self._base_frame_hists, dtype=np.float64)
        w = min(self.settings.window_parts, len(frames))
        rng = np.random.default_rng(0)
        windows = frames[rng.integers(0, len(frames), (100, w))].sum(axis=1)  # 100 windows, one per row
        noise = float(psi_rows(windows, self._base_hist).max())
        return max(PSI_LIMITS[0], 2.0 * noise), max(PSI_LIMITS[1], 3.0 * noise)

    # -- checks --------------------------------------------------------------------------

    def _check(self) -> None:
        levels: dict[str, int] = {}
        measures: dict[str, Any] = {}
        base = self._base_arrays
        n = min(self._parts, self.settings.window_parts)
        window = np.sort(self._win[:n].T, axis=1)  # one sorted row per column
        for col, name in enumerate(SCALARS):
            win = window[col]
            d = ks_statistic(win, base[name], presorted=True)  # the baseline is kept sorted
            b_med, w_med = self._base_median[name], float(win[n // 2])
            if name == "sharpness":  # kept as log1p(variance): report the ratio of variances
                change = math.expm1(w_med) / max(math.expm1(b_med), 1e-9) - 1.0
            else:
                change = (w_med - b_med) / max(abs(b_med), 1e-9)
            level = 0
            for lv in (1, 2):
                crit = max(ks_critical(n, len(base[name]), KS_ALPHA[lv - 1]), KS_MIN_D[lv - 1])
                if d >= crit and abs(change) >= MIN_RELATIVE_CHANGE[name][lv - 1]:
                    level = lv
            levels[name] = level
            measures[name] = {"ks_d": round(d, 4), "change": round(change, 4), "level": STATES[level],
                              "direction": 1 if w_med > b_med else -1 if w_med < b_med else 0}
        win_hist = self._win_hist[:n].sum(axis=0)
        p = psi(win_hist, self._base_hist)
        lim = self._psi_limits
        levels["histogram"] = 2 if p >= lim[1] else 1 if p >= lim[0] else 0
        measures["histogram"] = {"psi": round(p, 4), "limits": [round(v, 4) for v in lim], "level": STATES[levels["histogram"]],
                                 "direction": 0}
        for name, key in (("fail_rate", "failed"), ("near_threshold", "near")):
            k_win, k_base = int(window[COLUMNS.index(key)].sum()), int(base[key].sum())
            n_base = len(base[key])
            z = proportion_z(k_win, n, k_base, n_base)
            diff = k_win / n - k_base / n_base
            level = 0
            for lv in (1, 2):
                if abs(z) >= PROPORTION_Z[lv - 1] and abs(diff) >= PROPORTION_MIN_CHANGE[lv - 1]:
                    level = lv
            levels[name] = level
            measures[name] = {"window": round(k_win / n, 4), "baseline": round(k_base / n_base, 4), "z": round(z, 2),
                              "level": STATES[level], "direction": 1 if diff > 0 else -1 if diff < 0 else 0}
        if self._vs_training is not None:
            ref = np.asarray(self.reference["input"]["histogram"]["fraction"])
            measures["vs_training"] = {**self._vs_training, "window_psi": round(psi(win_hist, ref), 4)}
        self._levels, self._measures = levels, measures
        self._out_of_band = tuple(k for k in MEASURES if levels.get(k, 0) > 0)
        self._update_state(max(levels.values()))

    def _update_state(self, raw: int) -> None:
        s = self.settings
        for lv in range(3):
            self._above[lv] = self._above[lv] + 1 if raw >= lv else 0
            self._below[lv] = self._below[lv] + 1 if raw <= lv else 0
        new = self._level
        if new < 2 and self._above[2] >= s.persist_checks:
            new = 2
        elif new < 1 and self._above[1] >= s.persist_checks:
            new = 1
        elif new > 0 and self._below[0] >= s.clear_checks:
            new = 0
        elif new > 1 and self._below[1] >= s.clear_checks:
            new = 1
        if new != self._level:
            previous = STATES[self._level]
            self._level, self.state, self._since = new, STATES[new], time.time()
            self._events.append(("drift_state", {
                "state": self.state, "previous": previous, "model_version": self.model_version,
                "reasons": list(self._reasons()), "measures": _compact(self._measures),
            }))
            logger.warning("drift state %s -> %s: %s", previous, self.state, "; ".join(self._reasons()) or "back to usual")

    def _reasons(self) -> Iterable[str]:
        for name in MEASURES:
            if self._levels.get(name, 0) > 0:
                direction = self._measures[name].get("direction", 0)
                text = ADVICE.get((name, direction)) or ADVICE.get((name, 0)) or ADVICE.get((name, 1), name)
                yield f"{name}: {text}"

    # -- readers -------------------------------------------------------------------------

    def out_of_band(self) -> tuple[str, ...]:
        """Measures outside their band at the last check (drift sampling follows these)."""
        return self._out_of_band

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def take_baseline_record(self) -> str | None:
        """The baseline just learned, once, as JSON for the buffer's meta table."""
        with self._lock:
            record, self._baseline_record = self._baseline_record, None
        return record

    def snapshot(self) -> dict[str, Any]:
        """The status JSON's ``drift`` object (docs/agent.md, "Drift")."""
        with self._lock:
            out: dict[str, Any] = {
                "state": self.state,
                "checks": self.checks,
                "since": self._since,
                "model_version": self.model_version,
                "reasons": list(self._reasons()),
                "out_of_band": list(self._out_of_band),
                "measures": _compact(self._measures),
                "baseline_parts": len(self._base["score"]) if self.checks != "off" else 0,
                "window_parts": min(self._parts, self.settings.window_parts),
                "errors": self.errors,
            }
            if self.note:
                out["note"] = self.note
            return out


def _compact(measures: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) for k, v in measures.items()}


def banner(drift: dict[str, Any] | None) -> str | None:
    """One line for people (operator page, ``edge status``), or None when all is usual."""
    if not drift:
        return None
    if drift.get("checks") == "off":
        return str(drift.get("note") or "drift checks are off")
    if drift.get("state") in ("warning", "drift"):
        reasons = drift.get("reasons") or []
        head = "DRIFT" if drift["state"] == "drift" else "Warning"
        return f"{head}: " + ("; ".join(r.split(": ", 1)[-1] for r in reasons) or "the pictures changed")
    return None


def describe(drift: dict[str, Any] | None) -> str:
    """``edge status``'s drift line: the state, how far the checks are, and what to do."""
    if not drift:
        return "unknown (the agent has not written a status with drift yet)"
    checks = drift.get("checks")
    if checks == "off":
        return f"off: {drift.get('note') or 'drift checks are off'}"
    if checks == "baseline":
        return f"ok (learning this model's usual pictures: {drift.get('baseline_parts', 0)} parts so far)"
    line = str(drift.get("state", "unknown"))
    text = banner(drift)
    return f"{line}: {text.split(': ', 1)[-1]}" if text else line
