"""The int8 model on the box: runtime choice, loading, preprocessing and decision.

Runtimes are tried in order: LiteRT (``ai-edge-litert``), then the legacy
``tflite-runtime``, then ``tensorflow.lite``; :attr:`Classifier.runtime` says which one
is in use. ``LINEWATCH_RUNTIME`` forces one (for benchmarks and fallback checks).

The same :class:`Classifier` scores frames in the agent, golden images during OTA
validation and test sets in ``linewatch train eval``.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge import tiling as tiling_mod
from edge.exceptions import ChecksumMismatch, ModelLoadError, RuntimeUnavailable
from edge.fsutil import sha256_file
from edge.preprocess import quantize_lut, read_image, to_model_input
from edge.protocol import MODEL_FILE, Manifest, read_manifest

logger = logging.getLogger(__name__)

# (name reported in status, module, attribute holding the Interpreter class)
RUNTIMES: tuple[tuple[str, str], ...] = (
    ("litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite.python.interpreter"),
)


def load_runtime(prefer: str | None = None) -> tuple[str, Callable[..., Any]]:
    """Return ``(runtime_name, Interpreter class)`` for the first importable runtime.

    ``prefer`` (or the ``LINEWATCH_RUNTIME`` environment variable) names one runtime to use.
    """
    prefer = prefer or os.environ.get("LINEWATCH_RUNTIME") or None
    names = [n for n, _ in RUNTIMES]
    if prefer is not None and prefer not in names:
        raise RuntimeUnavailable(f"unknown runtime {prefer!r}; choose one of {', '.join(names)}")
    tried: list[str] = []
    for name, module in RUNTIMES:
        if prefer is not None and name != prefer:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            tried.append(f"{name}: {exc}")
            continue
        return name, mod.Interpreter
    raise RuntimeUnavailable(
        "no TFLite runtime could be imported ("
        + "; ".join(tried)
        + "); install the edge extra: pip install 'linewatch[edge]'"
    )


@dataclass(frozen=True)
class Prediction:
    """One decision: the most likely label, the defect score and pass/fail."""

    label: str
    score: float  # 1 - P(pass label): higher means more likely defective
    passed: bool
    probabilities: tuple[float, ...]
    raw: tuple[int, ...]  # the int8 output, as golden checks compare it
    preprocess_ms: float
    invoke_ms: float
    # Tiled bundles: the deciding input's box (x, y, width, height in the frame given to
    # predict) and every input's raw output, in edge/tiling.py's order.
    box: tuple[int, int, int, int] | None = None
    tile_raws: tuple[tuple[int, ...], ...] | None = None


class Classifier:
    """A loaded, verified model bundle ready to decide frames.

    ``predict`` is thread-safe (one interpreter, one lock): the agent's inspection thread
    and an OTA validation never share an instance anyway.
    """

    def __init__(
        self,
        bundle_dir: Path,
        *,
        runtime: str | None = None,
        num_threads: int | None = None,
        verify_checksum: bool = True,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        model_path = self.bundle_dir / self.manifest.model.file
        if not model_path.is_file():
            raise ModelLoadError(f"{model_path} is missing; the bundle is incomplete, export or push it again")
        if verify_checksum:
            actual = sha256_file(model_path)
            if actual != self.manifest.model.sha256:
                raise ChecksumMismatch(
                    f"{model_path} sha256 {actual[:12]}… does not match the manifest's "
                    f"{self.manifest.model.sha256[:12]}…; the model file is altered or damaged, re-export the bundle"
                )
        self.runtime, interpreter_cls = load_runtime(runtime)
        try:
            self._interpreter = interpreter_cls(model_path=str(model_path), num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{model_path}: the {self.runtime} runtime cannot load it ({exc})") from exc
        self._check_tensors()
        self._input_index = self._interpreter.get_input_details()[0]["index"]
        self._output_index = self._interpreter.get_output_details()[0]["index"]
        self._lut = quantize_lut(self.manifest.preprocessing, self.manifest.input)
        out = self.manifest.output
        self._out_scale, self._out_zero = out.scale, out.zero_point
        self._pass_index = self.manifest.pass_index
        self._lock = threading.Lock()
        self._batch_size = 1  # the input tensor's current batch dimension
        self._tiles: np.ndarray | None = None  # reused tile batch (tiled bundles)

    def _check_tensors(self) -> None:
        """The model must be what the manifest says: full-integer with the declared shapes."""
        m = self.manifest
        inp = self._interpreter.get_input_details()
        out = self._interpreter.get_output_details()
        if len(inp) != 1 or len(out) != 1:
            raise ModelLoadError(f"expected one input and one output tensor, found {len(inp)} and {len(out)}")
        problems = []
        if tuple(int(x) for x in inp[0]["shape"]) != m.input.shape:
            problems.append(f"input shape {list(inp[0]['shape'])} != manifest {list(m.input.shape)}")
        if np.dtype(inp[0]["dtype"]).name != m.input.dtype:
            problems.append(f"input dtype {np.dtype(inp[0]['dtype']).name} != manifest {m.input.dtype}")
        if tuple(int(x) for x in out[0]["shape"]) != m.output.shape:
            problems.append(f"output shape {list(out[0]['shape'])} != manifest {list(m.output.shape)}")
        if np.dtype(out[0]["dtype"]).name != m.output.dtype:
            problems.append(f"output dtype {np.dtype(out[0]['dtype']).name} != manifest {m.output.dtype}")
        if problems:
            raise ModelLoadError("model does not match its manifest: " + "; ".join(problems))

    @property
    def version(self) -> str:
        return self.manifest.version

    def quantize(self, image: np.ndarray) -> np.ndarray:
        """A frame (uint8 gray/BGR/BGRA, any size) -> the model's quantized input batch."""
        return to_model_input(image, self.manifest.preprocessing, self._lut)

    @property
    def tiling(self) -> Any:
        """The manifest's :class:`edge.protocol.Tiling`, or None for a whole-frame bundle."""
        return self.manifest.tiling

    def quantize_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """Model-size uint8 inputs (N, H, W, C) -> the quantized batch, by the lookup table."""
        n, h, w, c = inputs.shape
        return cv2.LUT(inputs.reshape(n * h, w * c), self._lut).reshape(inputs.shape)

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a quantized batch of one; returns the raw integer output row."""
        return self.invoke_batch(batch)[0]

    def invoke_batch(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a quantized batch of N inputs in one invoke; returns (N, outputs).

        The input tensor is resized when N changes (once for a camera's fixed frame size).
        One invoke per frame and one per tile were measured against each other in
        docs/benchmarks.md, "Tiles".
        """
        with self._lock:
            n = int(batch.shape[0])
            if n != self._batch_size:
                try:
                    self._interpreter.resize_tensor_input(self._input_index, [n, *self.manifest.input.shape[1:]])
                    self._interpreter.allocate_tensors()
                except (ValueError, RuntimeError) as exc:
                    raise ModelLoadError(f"the model cannot take a batch of {n} inputs ({exc})") from exc
                self._batch_size = n
            self._interpreter.set_tensor(self._input_index, batch)
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output_index).copy()

    def decide(self, raw: np.ndarray, score: float | None = None) -> tuple[str, float, bool, np.ndarray]:
        """Raw output -> (label, defect score, passed, probabilities) by the manifest's
        threshold; ``score`` is the part's when a tiled bundle's rule gave it (the label is
        then the deciding input's most likely defect)."""
        probs = (raw.astype(np.float32) - self._out_zero) * self._out_scale
        probs = np.clip(probs, 0.0, 1.0)
        if score is None:
            score = float(np.clip(1.0 - probs[self._pass_index], 0.0, 1.0))
        passed = score < self.manifest.threshold
        if passed:
            label = self.manifest.pass_label
        else:
            defect = probs.copy()
            defect[self._pass_index] = -1.0
            label = self.manifest.labels[int(np.argmax(defect))]
        return label, score, passed, probs

    def scores(self, raws: np.ndarray) -> np.ndarray:
        """Defect scores (1 - P(pass)) of raw output rows (N, outputs)."""
        p = (raws[:, self._pass_index].astype(np.float32) - self._out_zero) * self._out_scale
        return np.clip(1.0 - np.clip(p, 0.0, 1.0), 0.0, 1.0)

    def predict(self, image: np.ndarray) -> Prediction:
        """Decide one frame (a tiled bundle: every tile, the part's score is the worst one)."""
        if self.manifest.tiling is not None:
            return self._predict_tiled(image)
        t0 = time.perf_counter()
        batch = self.quantize(image)
        t1 = time.perf_counter()
        raw = self.invoke(batch)
        t2 = time.perf_counter()
        label, score, passed, probs = self.decide(raw)
        return Prediction(
            label=label,
            score=score,
            passed=passed,
            probabilities=tuple(float(p) for p in probs),
            raw=tuple(int(x) for x in raw),
            preprocess_ms=(t1 - t0) * 1000.0,
            invoke_ms=(t2 - t1) * 1000.0,
        )

    def _predict_tiled(self, image: np.ndarray) -> Prediction:
        assert self.manifest.tiling is not None
        t0 = time.perf_counter()
        tiles, grid = tiling_mod.cut(image, self.manifest.tiling, self.manifest.preprocessing.color_mode, self._tiles)
        self._tiles = tiles
        batch = self.quantize_inputs(tiles)
        t1 = time.perf_counter()
        raws = self.invoke_batch(batch)
        t2 = time.perf_counter()
        score, worst = tiling_mod.part_score(self.scores(raws), self.manifest.tiling)
        label, _, passed, probs = self.decide(raws[worst], score)
        return Prediction(
            label=label,
            score=score,
            passed=passed,
            probabilities=tuple(float(p) for p in probs),
            raw=tuple(int(x) for x in raws[worst]),
            preprocess_ms=(t1 - t0) * 1000.0,
            invoke_ms=(t2 - t1) * 1000.0,
            box=grid.boxes[worst],
            tile_raws=tuple(tuple(int(x) for x in r) for r in raws),
        )

    def predict_file(self, path: Path) -> Prediction:
        """Decide one image file (raises :class:`edge.exceptions.ImageError` when unreadable)."""
        return self.predict(read_image(path))


@dataclass(frozen=True)
class GoldenResult:
    """Outcome of running a bundle's golden images through a classifier."""

    ok: bool
    checked: int
    max_deviation: int
    p50_invoke_ms: float
    failures: tuple[str, ...]


def check_golden(classifier: Classifier) -> GoldenResult:
    """Run every golden image and compare the int8 outputs with the manifest's, within tolerance."""
    m = classifier.manifest
    failures: list[str] = []
    worst = 0
    times: list[float] = []
    if not m.golden:
        return GoldenResult(False, 0, 0, 0.0, ("bundle has no golden images",))
    for g in m.golden:
        path = classifier.bundle_dir / "golden" / Path(g.file).name
        try:
            pred = classifier.predict_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure on a golden image refuses the model
            failures.append(f"{g.file}: {exc}")
            continue
        times.append(pred.invoke_ms)
        if len(pred.raw) != len(g.expected):
            failures.append(f"{g.file}: {len(pred.raw)} outputs, expected {len(g.expected)}")
            continue
        dev = max(abs(a - b) for a, b in zip(pred.raw, g.expected, strict=True))
        if g.expected_tiles is not None:
            got = pred.tile_raws or ()
            if len(got) != len(g.expected_tiles):
                failures.append(
                    f"{g.file}: cut into {len(got)} model inputs, the manifest expects {len(g.expected_tiles)}"
                )
                continue
            dev = max(dev, int(np.max(np.abs(np.array(got, np.int32) - np.array(g.expected_tiles, np.int32)))))
        worst = max(worst, dev)
        if dev > m.golden_tolerance:
            failures.append(f"{g.file}: output {list(pred.raw)} differs from expected {list(g.expected)} by {dev}")
    p50 = float(np.median(times)) if times else 0.0
    return GoldenResult(not failures, len(m.golden), worst, p50, tuple(failures))


__all__ = [
    "MODEL_FILE",
    "Classifier",
    "GoldenResult",
    "Prediction",
    "check_golden",
    "load_runtime",
]
