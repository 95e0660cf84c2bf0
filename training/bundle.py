"""Write a model bundle folder exactly as :mod:`edge.protocol` defines it.

Layout (see edge/protocol.py)::

    model.tflite        full-integer int8 model
    manifest.json       edge.protocol.Manifest, validated before it is written
    golden/*.png        test images at model size; their expected int8 outputs are in the manifest
    report/             confusion.png, roc.png, pr.png, metrics.json, model_card.md,
                        model_float32.tflite (the float twin, for comparisons; never loaded by the edge)

A bundle is assembled in a staging folder beside the destination and moved into place
at the end, so an interrupted run never leaves a half-written bundle under ``--out``.
The manifest's blocks are assembled here too: :class:`ManifestHeader`, :func:`dataset_info`,
:func:`training_info`, :func:`tiles_info` and :func:`metrics_info`.
The single-file form (``.lwb``) is :func:`edge.bundle.pack_bundle`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edge.fsutil import atomic_write, sha256_file
from edge.inference import Classifier, check_golden
from edge.protocol import (
    GOLDEN_DIR,
    MANIFEST_FILE,
    MANIFEST_SCHEMA_VERSION,
    MODEL_FILE,
    REPORT_DIR,
    Manifest,
    parse_manifest,
)
from training import tiles as tiles_mod
from training.dataset import DataReport, Split
from training.evaluate import Evaluation
from training.exceptions import TrainingError

if TYPE_CHECKING:  # training.model imports TensorFlow, which only training itself needs
    from training.model import TrainConfig, TrainResult

logger = logging.getLogger(__name__)

GOLDEN_PER_CLASS = 8
GOLDEN_TOLERANCE = 2  # int8 steps; the same runtime reproduces 0, another build may differ by 1
SCORE_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
PIXEL_BINS = 16
SCORE_BINS = 10
FLOAT_MODEL_FILE = "model_float32.tflite"


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_version() -> str:
    """A sortable version when none is given: UTC date and time."""
    return datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that holds something other than a bundle (never delete a user's files)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise TrainingError(f"--out {out_dir} is a file; pass a folder path for the bundle")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
            raise TrainingError(
                f"--out {out_dir} exists and is not a model bundle; pass a new or empty folder (it would be replaced)"
            )


def staging_dir(out_dir: Path) -> Path:
    """A fresh folder beside ``out_dir`` (same filesystem, so the final move is a rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / GOLDEN_DIR).mkdir(parents=True)
    (staging / REPORT_DIR).mkdir()
    return staging


def install_bundle(staging: Path, out_dir: Path) -> Path:
    """Move the finished staging folder to ``out_dir``, replacing an older bundle there."""
    check_out_dir(out_dir)
    old: Path | None = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def reference_statistics(
    x_train: np.ndarray,
    val_scores: np.ndarray,
    val_labels: Sequence[str],
    labels: Sequence[str],
) -> dict[str, Any]:
    """Drift references: input pixels on the training split, int8 defect scores per class on validation.

    Pixels are the model-size uint8 values (0-255) after colour conversion and resize, the
    values the agent sees right before quantization.
    """
    pixels = np.asarray(x_train, dtype=np.float64)
    hist, edges = np.histogram(x_train, bins=PIXEL_BINS, range=(0, 256))
    per_image_mean = pixels.mean(axis=tuple(range(1, pixels.ndim))) if len(pixels) else np.zeros(0)
    scores = np.asarray(val_scores, dtype=np.float64)
    score_edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    per_class: dict[str, Any] = {}
    lab = np.asarray(list(val_labels), dtype=object)
    for label in labels:
        s = scores[lab == label]
        h, _ = np.histogram(s, bins=score_edges)
        per_class[label] = {
            "n": len(s),
            "mean": round(float(s.mean()), 6) if len(s) else None,
            "quantiles": [round(float(q), 6) for q in np.quantile(s, SCORE_QUANTILES)] if len(s) else [],
            "histogram": [round(float(v), 6) for v in (h / max(1, len(s)))],
        }
    return {
        "input": {
            "split": "train",
            "n": len(pixels),
            "pixel_mean": round(float(pixels.mean()), 4) if len(pixels) else None,
            "pixel_std": round(float(pixels.std()), 4) if len(pixels) else None,
            "image_mean_std": round(float(per_image_mean.std()), 4) if len(pixels) else None,
            "histogram": {
                "edges": [int(e) for e in edges],
                "fraction": [round(float(v), 6) for v in hist / max(1, hist.sum())],
            },
        },
        "scores": {
            "split": "val",
            "model": "int8",
            "score": "1 - P(pass label)",
            "quantile_levels": list(SCORE_QUANTILES),
            "histogram_edges": [round(float(e), 3) for e in score_edges],
            "per_class": per_class,
        },
    }


def select_golden(labels_of: Sequence[str], per_class: int = GOLDEN_PER_CLASS) -> list[int]:
    """Indices of up to ``per_class`` images of each class (the first ones, in split order)."""
    picked: list[int] = []
    seen: dict[str, int] = {}
    for i, label in enumerate(labels_of):
        if seen.get(label, 0) < per_class:
            picked.append(i)
            seen[label] = seen.get(label, 0) + 1
    return picked


def write_golden(bundle_dir: Path, images: Sequence[np.ndarray], labels_of: Sequence[str], color_mode: str) -> list[dict[str, str]]:
    """Save uint8 images (model-size, or whole frames for a tiled bundle) as lossless PNGs
    under golden/; returns [{file, label}]."""
    entries: list[dict[str, str]] = []
    counters: dict[str, int] = {}
    for image, label in zip(images, labels_of, strict=True):
        n = counters.get(label, 0)
        counters[label] = n + 1
        rel = f"{GOLDEN_DIR}/{label}_{n:02d}.png"
        out = image[:, :, 0] if image.shape[-1] == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(Path(bundle_dir) / rel), out):
            raise TrainingError(f"cannot write golden image {rel} under {bundle_dir}; check disk space and permissions")
        entries.append({"file": rel, "label": label})
    return entries


def golden_expectations(classifier: Classifier, entries: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Run each golden PNG through the edge classifier, exactly as OTA validation will."""
    out = []
    for e in entries:
        pred = classifier.predict_file(classifier.bundle_dir / e["file"])
        entry: dict[str, Any] = {"file": e["file"], "label": e["label"], "expected": list(pred.raw)}
        if pred.tile_raws is not None:
            entry["expected_tiles"] = [list(r) for r in pred.tile_raws]
        out.append(entry)
    return out


def write_manifest(bundle_dir: Path, manifest: Mapping[str, Any]) -> Manifest:
    """Validate with the edge's own schema, then write manifest.json."""
    parsed = parse_manifest(json.loads(json.dumps(manifest)), source="manifest being written")
    path = Path(bundle_dir) / MANIFEST_FILE
    atomic_write(path, json.dumps(manifest, indent=2) + "\n")
    return parsed


def build_manifest(
    *,
    bundle_dir: Path,
    name: str,
    version: str,
    labels: Sequence[str],
    pass_label: str,
    threshold: float,
    input_spec: Mapping[str, Any],
    output_spec: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    metrics: Mapping[str, Any],
    dataset: Mapping[str, Any],
    training: Mapping[str, Any],
    reference: Mapping[str, Any],
    golden: Sequence[Mapping[str, Any]] = (),
    golden_tolerance: int = GOLDEN_TOLERANCE,
    latency_budget_ms: float = 50.0,
    created: str | None = None,
    operating_point: Mapping[str, Any] | None = None,
    tiling: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict for ``bundle_dir/model.tflite`` (its sha256 and size are read here)."""
    model_path = Path(bundle_dir) / MODEL_FILE
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": name,
        "version": version,
        "created": created or utc_now(),
        "model": {"file": MODEL_FILE, "sha256": sha256_file(model_path), "bytes": model_path.stat().st_size},
        "labels": list(labels),
        "pass_label": pass_label,
        "threshold": float(threshold),
        "input": dict(input_spec),
        "output": dict(output_spec),
        "preprocessing": dict(preprocessing),
        "metrics": dict(metrics),
        "dataset": dict(dataset),
        "training": dict(training),
        "reference": dict(reference),
        "golden": [dict(g) for g in golden],
        "golden_tolerance": golden_tolerance,
        "latency_budget_ms": float(latency_budget_ms),
        **({"operating_point": dict(operating_point)} if operating_point is not None else {}),
        **({"tiling": dict(tiling)} if tiling is not None else {}),
    }


@dataclass(frozen=True)
class ManifestHeader:
    """The manifest fields known before evaluation: what the bundle is and how to feed its model."""

    name: str
    version: str
    created: str
    labels: list[str]
    pass_label: str
    input_spec: dict[str, Any]
    output_spec: dict[str, Any]
    preprocessing: dict[str, Any]
    tiling: dict[str, Any] | None = None

    def manifest(self, bundle_dir: Path, **fields: Any) -> dict[str, Any]:
        """:func:`build_manifest` of these fields and ``fields`` (threshold, metrics, ...)."""
        return build_manifest(bundle_dir=bundle_dir, **asdict(self), **fields)


def dataset_info(data: DataReport, split: Split, *, group_by: str = "none", group_gap: int = 0) -> dict[str, Any]:
    """The manifest's ``dataset``: what the data check found and how it was split."""
    grouping = {"group_by": group_by, "group_gap": group_gap} if group_by != "none" else {}
    return {
        "fingerprint": data.fingerprint,
        "class_counts": dict(data.class_counts),
        "images": len(data.samples),
        "unreadable_skipped": len(data.unreadable),
        "duplicates_removed": len(data.duplicates),
        "split": split.to_dict() | grouping,
        "warnings": list(data.warnings),
    }


def tiles_info(crops: tiles_mod.PoolCrops, rule: tiles_mod.RuleChoice | None) -> dict[str, Any]:
    """The manifest's ``training.tiles``: how the training crops were made (training/tiles.py
    has the rules) and the decision rule chosen."""
    train_set, val_set = crops.of_train(), crops.of_val()
    return {
        "crops_train": len(train_set),
        "defect_crops_train": int(np.sum(train_set.y != crops.pass_class)),
        "whole_views_train": int(np.sum(train_set.whole)),
        "crops_val": len(val_set),
        "defect_pictures_without_mask": int(np.sum(crops.unmasked)),
        "crop_rule": f"defect when >= min({tiles_mod.DEFECT_PIXELS}, half the picture's) defect pixels "
        f"(mask coverage >= {tiles_mod.COVERAGE}), good when none, else left out",
        "crops_per_picture": {
            "good": tiles_mod.NEGATIVES_PER_PICTURE,
            "defect_focus": tiles_mod.FOCUS_PER_DEFECT,
            "defect_context": tiles_mod.CONTEXT_PER_DEFECT,
        },
        "without_mask": "multiple-instance: the picture's highest-scoring tile, second round of half the epochs",
    } | ({"decision_rule": rule.to_dict()} if rule else {})


def training_info(
    config: TrainConfig,
    trained: TrainResult,
    *,
    epochs_chosen: str,
    operating_point_shift: float,
    merged_outputs: bool,
    tiles: Mapping[str, Any] | None,
    representative_images: int,
    durations: Mapping[str, float],
) -> dict[str, Any]:
    """The manifest's ``training``: the recipe, how the run went, the network and its int8
    conversion. Called after training, so importing TensorFlow here costs nothing."""
    import keras
    import tensorflow as tf

    from training import model as model_mod

    architecture = model_mod.model_summary(trained.model) | {
        "filters": config.filters,
        "head": trained.head,
        "stem": config.stem,
        "shading": config.shading,
    }
    return {
        "epochs": config.epochs,
        "epochs_chosen": epochs_chosen,
        "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch,
        "stopped_early": trained.stopped_early,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": "cosine per epoch to 5 %",
        "patience": config.patience,
        "early_stopping": "val loss (class-weighted), best weights restored",
        "class_weighting": "balanced (n / (classes x n_class))",
        "operating_point_shift": round(operating_point_shift, 4),
        "outputs": "pass vs defect (defect classes merged)" if merged_outputs else "one per class folder",
        "augmentation": config.augmentation.to_dict(),
        "architecture": architecture,
        **({"tiles": dict(tiles)} if tiles is not None else {}),
        "masks": {
            "used": trained.used_masks,
            "train_images_with_defect_mask": trained.masked_images,
            "mask_weight": config.mask_weight,
            "mask_pos_weight": config.mask_pos_weight,
            # defect transplant (training/transplant.py): the setting and the final model's count
            "transplant": config.transplant,
            "transplanted": trained.transplants,
        },
        "parameters": int(trained.model.count_params()),
        "representative_images": representative_images,
        "quantization": "full-integer int8 post-training (TFLITE_BUILTINS_INT8, int8 input and output)",
        "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "history": [asdict(h) for h in trained.history],
    }


def metrics_info(evaluation: Evaluation) -> dict[str, Any]:
    """The manifest's ``metrics``: both models on the test split, the gate and the latency."""
    return {
        "split": "test",
        "float": evaluation.float_metrics,
        "int8": evaluation.int8_metrics,
        "float_operating_point": evaluation.float_point.to_manifest(),
        "quantization_gate": evaluation.gate,
        "latency": evaluation.latency,
        "runtime": evaluation.runtime,
    }


def verify_bundle(bundle_dir: Path) -> None:
    """Load the bundle as the edge does and run its golden images; raise if anything is off."""
    clf = Classifier(Path(bundle_dir))
    result = check_golden(clf)
    if not result.ok:
        raise TrainingError(
            f"the bundle written to {bundle_dir} fails its own golden check ({'; '.join(result.failures[:3])}); "
            "this is a bug in the trainer, please report it"
        )


__all__ = [
    "FLOAT_MODEL_FILE",
    "GOLDEN_PER_CLASS",
    "GOLDEN_TOLERANCE",
    "ManifestHeader",
    "build_manifest",
    "check_out_dir",
    "dataset_info",
    "default_version",
    "golden_expectations",
    "install_bundle",
    "metrics_info",
    "reference_statistics",
    "select_golden",
    "staging_dir",
    "tiles_info",
    "training_info",
    "utc_now",
    "verify_bundle",
    "write_golden",
    "write_manifest",
]
