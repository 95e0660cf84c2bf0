"""Metrics of a pass/fail inspector and scoring a bundle on a folder (the threshold is chosen in training/operating_point.py).

Everything is computed from two arrays: whether each image is a defect (its folder is not
the pass class) and its defect score ``1 - P(pass label)``. The decision rule is the
edge's, :meth:`edge.inference.Classifier.decide`: *fail when score >= threshold*.

- accuracy: share of correct pass/fail decisions.
- balanced_accuracy: mean of defect recall and pass recall (1 - false_reject_rate), so a
  line where 95 % of parts pass cannot score 0.95 by passing everything.
- defect_recall: share of defect images failed. defect_precision: share of failed images
  that are defects. false_reject_rate: share of pass images failed (good parts scrapped).
- roc_auc (threshold-free ranking quality), pr_auc (average precision, defects positive).
- confusion: per true class, how many images passed and failed.
- per_class_recall: per class, the share decided correctly (passed for the pass class,
  failed for a defect class).
- recall_by_visibility (``evaluate_bundle`` on a ``train synth`` folder only): recall of
  the scratched images per band of scratch visibility (docs/training.md).

Pure numpy (no scikit-learn); this module does not import TensorFlow.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.exceptions import ImageError
from edge.inference import Classifier
from training.dataset import class_folders, list_images
from training.exceptions import DataError
from training.native import quiet_native_output
from training.operating_point import OperatingPoint, OperatingScores

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evaluation:
    """A fit's float and int8 models on its test split, and the int8 model's speed: what
    ``train fit`` prints, writes into the manifest's metrics and draws in the report."""

    point: OperatingPoint  # the shipped one, chosen on ``shipped_scores``
    shipped_scores: OperatingScores  # held-out scores in the shipped model's scale
    float_point: OperatingPoint  # the float model's own, on its held-out scores
    int8_metrics: dict[str, Any]  # at ``point``
    float_metrics: dict[str, Any]  # at ``float_point``
    test_labels: list[str]
    test_is_defect: np.ndarray
    int8_test: np.ndarray  # defect scores per test image (picture, for a tiled fit)
    float_test: np.ndarray
    val_labels: list[str]
    int8_val: np.ndarray  # the drift references' score statistics
    latency: dict[str, Any]  # runtime, threads and p50/p99 of both models
    latency_budget_ms: float
    gate: dict[str, Any]  # quantization_gate's verdict at the shipped threshold
    runtime: str  # the TFLite runtime the edge classifier picked

def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def _cumulative(is_defect: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Defects and passes at or above each distinct score (highest first), and those scores."""
    y = np.asarray(is_defect, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.where(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], dtype=int)
    return np.cumsum(y)[last_of_each], np.cumsum(~y)[last_of_each], s[last_of_each]


def roc_curve(is_defect: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), one point per distinct score, highest first.

    The first point is (0, 0) at threshold +inf (nothing fails).
    """
    y = np.asarray(is_defect, dtype=bool)
    tps, fps, thresholds = _cumulative(y, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tps / max(n_pos, 1)]
    fpr = np.r_[0.0, fps / max(n_neg, 1)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(is_defect: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half); None when one side has no images."""
    y = np.asarray(is_defect, dtype=bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pr_curve(is_defect: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for defects as positives, one point per distinct score.

    The first point is (precision 1, recall 0) at threshold +inf.
    """
    y = np.asarray(is_defect, dtype=bool)
    tps, fps, thresholds = _cumulative(y, scores)
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / max(int(y.sum()), 1)
    return np.r_[1.0, precision], np.r_[0.0, recall], np.r_[np.inf, thresholds]


def average_precision(is_defect: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    y = np.asarray(is_defect, dtype=bool)
    if not y.any():
        return None
    precision, recall, _ = pr_curve(y, scores)
    return float(np.sum(np.diff(recall) * precision[1:]))


def _round(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(float(v), digits)


def compute_metrics(
    true_labels: Sequence[str],
    scores: np.ndarray,
    pass_label: str,
    threshold: float,
    *,
    failed: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every metric of the module docstring for one set of images.

    ``failed`` defaults to ``scores >= threshold`` (the edge's rule); pass the edge's own
    decisions to evaluate exactly what the box decided.
    """
    labels = np.asarray(list(true_labels), dtype=object)
    s = np.asarray(scores, dtype=np.float64)
    if len(labels) != len(s):
        raise ValueError("one score per image is needed")
    y = labels != pass_label
    fail = s >= threshold if failed is None else np.asarray(failed, dtype=bool)
    tp = int(np.sum(fail & y))
    fn = int(np.sum(~fail & y))
    fp = int(np.sum(fail & ~y))
    tn = int(np.sum(~fail & ~y))
    n = len(s)
    recall = _safe_div(tp, tp + fn)
    pass_recall = _safe_div(tn, tn + fp)
    balanced = None if recall is None or pass_recall is None else (recall + pass_recall) / 2
    classes = sorted(set(labels.tolist()), key=lambda c: (c != pass_label, c))
    confusion = {
        c: {"pass": int(np.sum(~fail[labels == c])), "fail": int(np.sum(fail[labels == c]))} for c in classes
    }
    per_class = {
        c: _round(float(np.mean(~fail[labels == c] if c == pass_label else fail[labels == c]))) for c in classes
    }
    return {
        "n": n,
        "n_defect": int(y.sum()),
        "n_pass": int((~y).sum()),
        "accuracy": _round((tp + tn) / n) if n else None,
        "balanced_accuracy": _round(balanced),
        "defect_recall": _round(recall),
        "defect_precision": _round(_safe_div(tp, tp + fp)),
        "false_reject_rate": _round(None if pass_recall is None else 1 - pass_recall),
        "roc_auc": _round(roc_auc(y, s)),
        "pr_auc": _round(average_precision(y, s)),
        "threshold": float(threshold),
        "confusion": confusion,
        "counts": {"tp": tp, "fn": fn, "fp": fp, "tn": tn},
        "per_class_recall": per_class,
    }


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 4) if len(values) else None


def evaluate_bundle(
    bundle_dir: Path,
    data_dir: Path,
    pass_label: str | None = None,
    *,
    runtime: str | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Score every image of a folder-per-class DATA_DIR through the edge's :class:`Classifier`.

    The model file is verified against the manifest's sha256 first (a mismatch raises
    :class:`edge.exceptions.ChecksumMismatch`). Decisions are the classifier's own. Images
    that cannot be read are counted and listed, not fatal. ``pass_label`` names the pass
    folder of DATA_DIR when it differs from the bundle's pass label. When DATA_DIR holds
    a ``train synth`` synth.json with visibility, ``recall_by_visibility`` gives the
    recall per visibility band of the scratched images
    (:func:`training.synth.recall_by_visibility`) beside the unchanged false-reject rate.
    """
    t0 = time.perf_counter()
    with quiet_native_output():  # the runtime announces its delegate on stderr
        clf = Classifier(Path(bundle_dir), runtime=runtime, num_threads=num_threads)
    manifest = clf.manifest
    folders = [f.name for f in class_folders(Path(data_dir))]
    wanted = pass_label if pass_label is not None else manifest.pass_label
    if pass_label is not None and pass_label not in folders:
        raise DataError(
            f"pass label {pass_label!r} is not a class folder in {data_dir} (found: {', '.join(folders)}); "
            "--pass-label must be one of them"
        )
    if wanted not in folders:
        logger.warning("%s has no %r folder: pass-side metrics will be null", data_dir, wanted)
    images = list_images(Path(data_dir))
    true: list[str] = []
    files: list[str] = []
    scores: list[float] = []
    failed: list[bool] = []
    invoke_ms: list[float] = []
    preprocess_ms: list[float] = []
    unreadable: list[dict[str, str]] = []
    for path, label in images:
        try:
            pred = clf.predict_file(path)
        except ImageError as exc:
            unreadable.append({"file": str(path), "error": str(exc)})
            continue
        true.append(label)
        files.append(f"{label}/{path.name}")
        scores.append(pred.score)
        failed.append(not pred.passed)
        invoke_ms.append(pred.invoke_ms)
        preprocess_ms.append(pred.preprocess_ms)
    if not true:
        raise DataError(f"none of the {len(images)} images in {data_dir} could be read; check that they are jpg/png/bmp")
    metrics = compute_metrics(true, np.array(scores), wanted, manifest.threshold, failed=np.array(failed))
    # a synthetic set knows how visible each scratch is (train synth's synth.json)
    from training.synth import read_visibility, recall_by_visibility

    visibility = read_visibility(Path(data_dir))
    if visibility is not None:
        by_band = recall_by_visibility(*visibility, files, failed)
        metrics["recall_by_visibility"] = {**by_band, "false_reject_rate": metrics["false_reject_rate"]}
    metrics.update(
        {
            "pass_label": wanted,
            "bundle": {"name": manifest.name, "version": manifest.version, "path": str(bundle_dir)},
            # how the bundle's threshold was chosen, and what it gave there (None for older bundles)
            "operating_point": manifest.operating_point.model_dump() if manifest.operating_point else None,
            "data_dir": str(data_dir),
            "runtime": clf.runtime,
            "invoke_ms_p50": percentile_ms(invoke_ms, 50),
            "invoke_ms_p99": percentile_ms(invoke_ms, 99),
            "preprocess_ms_p50": percentile_ms(preprocess_ms, 50),
            "unreadable": len(unreadable),
            "unreadable_files": unreadable,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    return metrics


__all__ = [
    "Evaluation",
    "average_precision",
    "compute_metrics",
    "evaluate_bundle",
    "pr_curve",
    "roc_auc",
    "roc_curve",
]
