"""``linewatch train fit`` end to end: data check -> split -> train -> int8 -> evaluate -> bundle.

1. :func:`training.dataset.scan_dataset` verifies DATA_DIR and fingerprints it.
2. A stratified (optionally grouped) train/val/test split, seeded.
3. The CNN trains on train, early-stopping on val loss (:mod:`training.model`).
4. Full-integer int8 conversion calibrated on training images, plus a float32 twin.
5. The operating point (:mod:`training.operating_point`): on validation scores, or on
   out-of-fold scores (:mod:`training.folds`) when validation holds few defects, for the
   target recall and false-reject budget; the float cut is moved to the middle of the
   output range before the export, and the shipped cut is chosen again on the int8 model
   through :class:`edge.inference.Classifier`, the agent's code. The test split is scored
   once, at the end, by both the float and the int8 model.
6. Quantization gate: at the shipped threshold, int8 balanced accuracy on test may be at
   most ``max_quantization_drop`` points below float's, and its ROC AUC at most 0.005
   lower, unless ``allow_quantization_drop``.
7. Golden images, reference statistics, report and manifest; the bundle is verified by
   loading it as the edge does and moved into ``out_dir``.

Imports TensorFlow (through :mod:`training.model`): import it inside commands only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.inference import Classifier
from edge.preprocess import quantize_lut, read_image, to_color_mode, to_float
from edge.protocol import MODEL_FILE, REPORT_DIR, Preprocessing, Tiling
from edge.tiling import MIN_TILE, rule_scores
from training import bundle as bundle_mod
from training import native, report
from training.dataset import (
    DataReport,
    Split,
    label_indices,
    load_arrays,
    load_masks,
    number_groups,
    scan_dataset,
    split_dataset,
)
from training.evaluate import compute_metrics
from training.exceptions import QuantizationGateError, TrainingError
from training.operating_point import (
    DEFAULT_FOLDS,
    DEFAULT_MAX_FALSE_REJECT,
    DEFAULT_TARGET_RECALL,
    MIN_VALIDATION_DEFECTS,
    SCORES_FILE,
    OperatingPoint,
    OperatingScores,
    check_budgets,
)
from training.tiles import (
    PoolCrops,
    RuleChoice,
    check_pictures,
    choose_rule,
    join,
    picture_inputs,
    picture_parts,
    picture_scores,
)

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]
DEFAULT_SIZE = 128
# First-layer filters (later blocks 2x-8x). 16 since 2026-12-04, when the fused BatchNorm
# made it cost what 8 did before: on the default synthetic set (seeds 0 and 1) test ROC AUC
# 0.989 / 0.984 against 0.978 with 8, false rejects at 99 % of the clear scratches 10-22 %
# against 33 %, int8 invoke 1.0-1.1 ms on one core (docs/training.md).
DEFAULT_FILTERS = 16
# Without --epochs a fit gets about this many training-image passes, whatever the data size:
# about 260 s of training on the quiet 2-core build box (~430 images/s since augmentation
# runs in the graph). Twice the passes of the earlier 56,000 gave +0.01 test ROC AUC on the
# synthetic set, whether as 8000 images x 20 epochs or 4000 x 40 (docs/training.md).
AUTO_EPOCH_IMAGES = 112_000
AUTO_EPOCHS_RANGE = (10, 60)


def auto_epochs(n_train: int) -> int:
    """Epochs for ``n_train`` training images when --epochs is not given."""
    low, high = AUTO_EPOCHS_RANGE
    return max(low, min(high, math.ceil(AUTO_EPOCH_IMAGES / max(1, n_train))))


MAX_QUANTIZATION_DROP = 1.0  # balanced-accuracy points
MAX_QUANTIZATION_AUC_DROP = 0.005  # ROC AUC
# The model's defect output when several defect classes are merged (see FitOptions.defects).
MERGED_DEFECT_LABEL = "defect"
LATENCY_SAMPLES = 200


@dataclass(frozen=True)
class FitOptions:
    """Every knob of ``train fit``; the defaults are the ones the CLI uses."""

    epochs: int | None = None  # None: auto_epochs(training images)
    seed: int = 0
    pass_label: str | None = None
    target_recall: float = DEFAULT_TARGET_RECALL
    max_false_reject: float = DEFAULT_MAX_FALSE_REJECT
    # k-fold out-of-fold scores choose the threshold when validation holds fewer than
    # MIN_VALIDATION_DEFECTS defects; 0 never trains fold models (validation alone).
    folds: int = DEFAULT_FOLDS
    label_smoothing: float = 0.1
    size: int = DEFAULT_SIZE  # model input width, and height unless ``height`` is set
    height: int | None = None  # a non-square input keeps the camera's aspect ratio
    color_mode: str = "gray"
    interpolation: str = "area"
    version: str | None = None
    name: str | None = None
    batch_size: int = 32
    learning_rate: float = 3e-3
    patience: int = 8
    filters: int = DEFAULT_FILTERS
    augment: bool = True
    masks: Path | None = None  # defect masks folder; default DATA_DIR/masks when it exists
    group_by: str = "none"  # "none" or "number" (see training.dataset.number_groups)
    # "merged": with more than one defect class the network learns pass vs defect (two
    # outputs), which is the decision the line needs; small defect classes then add to one
    # well-populated class instead of each getting a huge loss weight. Per-class recall is
    # still reported. "separate": one softmax output per class folder.
    defects: str = "merged"
    group_gap: int = 100
    max_quantization_drop: float = MAX_QUANTIZATION_DROP
    allow_quantization_drop: bool = False
    golden_per_class: int = bundle_mod.GOLDEN_PER_CLASS
    min_per_class: int = 10
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    latency_samples: int = LATENCY_SAMPLES
    # Tiles (training/tiles.py): the model learns on tile x tile crops of the picture at
    # ``scale`` instead of the whole picture squeezed to ``size``. ``tile`` is in picture
    # pixels; the model input is tile x scale.
    tile: tuple[int, int] | None = None
    # The map head's decision clip (training/model.py, build_networks); None: no clip.
    # "auto": 6 for whole pictures, none for tiles, where the max over many tiles would
    # pile good and defect pictures onto the clip's one top score (docs/training.md, "Tiles").
    map_clip: float | str | None = "auto"
    scale: float = 1.0
    overlap: float = 0.25
    whole_frame: bool = True
    stem: str = "pool"  # training/model.py, build_networks: "pool" or "strided"
    shading: bool = False  # the map head's shading branch (training/model.py, build_networks)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        check_budgets(self.target_recall, self.max_false_reject)
        if self.folds == 1 or self.folds < 0:
            raise ValueError("folds must be 0 (validation only) or at least 2")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label smoothing must be in [0, 0.5)")
        if not 8 <= self.size <= 1024 or not 8 <= (self.height or self.size) <= 1024:
            raise ValueError("size must be between 8 and 1024 pixels")
        if self.color_mode not in ("gray", "rgb"):
            raise ValueError("color mode must be 'gray' or 'rgb'")
        if self.group_by not in ("none", "number"):
            raise ValueError("group_by must be 'none' or 'number'")
        if self.stem not in ("pool", "strided"):
            raise ValueError(f"stem must be 'pool' or 'strided', got {self.stem!r}")
        if self.defects not in ("merged", "separate"):
            raise ValueError("defects must be 'merged' or 'separate'")
        if not 0.0 < self.scale <= 4.0:
            raise ValueError(f"scale {self.scale:g} is outside (0, 4]")
        if not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"overlap {self.overlap:g} is outside [0, 0.9)")
        if self.tile is not None:
            width, height = self.model_tile
            if min(width, height) < MIN_TILE or max(width, height) > 1024:
                raise ValueError(
                    f"a {self.tile[0]}x{self.tile[1]} tile at scale {self.scale:g} is a {width}x{height} model input; "
                    f"it must be {MIN_TILE}-1024 pixels a side: use a larger --tile or --scale"
                )

    @property
    def model_tile(self) -> tuple[int, int]:
        """The model input (width, height) of one tile: ``tile`` x ``scale``."""
        if self.tile is None:
            return self.size, self.height or self.size
        return max(1, int(round(self.tile[0] * self.scale))), max(1, int(round(self.tile[1] * self.scale)))

    @property
    def tiling(self) -> Tiling | None:
        """The manifest's tiling, or None for a model of whole pictures."""
        if self.tile is None:
            return None
        width, height = self.model_tile
        return Tiling(width=width, height=height, scale=self.scale, overlap=self.overlap, whole_frame=self.whole_frame)


@dataclass(frozen=True)
class FitResult:
    """What ``fit`` produced: where the bundle is and the figures a person looks at first."""

    bundle_dir: Path
    manifest: dict[str, Any]
    float_metrics: dict[str, Any]
    int8_metrics: dict[str, Any]
    operating_point: OperatingPoint
    gate_passed: bool
    seconds: float
    durations: dict[str, float] = field(default_factory=dict)


def _default_name(data_dir: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(data_dir).resolve().name).strip("-") or "model"
    return f"linewatch-{base}"[:128]


def _scores(probs: np.ndarray, pass_index: int) -> np.ndarray:
    return np.clip(1.0 - probs[:, pass_index], 0.0, 1.0)


def _int8_scores(clf: Classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Scores and raw outputs through the edge classifier for model-size uint8 images.

    Images are already colour-converted and resized by :func:`edge.preprocess.resize_uint8`,
    so only the classifier's lookup-table quantization remains (what ``to_model_input`` does).
    """
    lut = quantize_lut(clf.manifest.preprocessing, clf.manifest.input)
    scores, raws, times = [], [], []
    for image in images:
        t0 = time.perf_counter()
        raw = clf.invoke(lut[image][None, ...])
        times.append((time.perf_counter() - t0) * 1000.0)
        _, score, _, _ = clf.decide(raw)
        scores.append(score)
        raws.append(raw)
    return np.array(scores, dtype=np.float64), np.array(raws), times


def _latency(invoke: Callable[[np.ndarray], Any], batches: list[np.ndarray], n: int) -> dict[str, float]:
    """p50/p99 invoke time over ``n`` invokes (after a short warm-up)."""
    for b in batches[:5]:
        invoke(b)
    times = []
    for i in range(n):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        invoke(b)
        times.append((time.perf_counter() - t0) * 1000.0)
    arr = np.array(times)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 4),
        "p99_ms": round(float(np.percentile(arr, 99)), 4),
        "n": n,
    }


def quantization_gate(
    float_balanced: float | None,
    int8_balanced: float | None,
    max_drop_points: float,
    *,
    allow: bool,
    out_dir: Path | None = None,
    threshold: float | None = None,
    float_auc: float | None = None,
    int8_auc: float | None = None,
    max_auc_drop: float = MAX_QUANTIZATION_AUC_DROP,
) -> dict[str, Any]:
    """Compare int8 with float: balanced accuracy at the shipped ``threshold`` (at most
    ``max_drop_points`` points lower) and ROC AUC (at most ``max_auc_drop`` lower, when both
    are given); ``passed`` is False when either drops by more.

    ``allow`` (``--allow-quantization-drop``) accepts a failed comparison, and says so.
    """
    f, q = float(float_balanced or 0.0), float(int8_balanced or 0.0)
    # Rounded: 0.705 - 0.695 is 1.0000000000000009 points in floating point, and exactly
    # the limit is not "more than" it.
    drop = round(100.0 * (f - q), 6)
    auc_drop = round(float(float_auc) - float(int8_auc), 6) if float_auc is not None and int8_auc is not None else None
    within_ba = drop <= max_drop_points
    within_auc = auc_drop is None or auc_drop <= max_auc_drop
    within = within_ba and within_auc
    at = f" at threshold {threshold:.4f}" if threshold is not None else ""
    parts = [
        f"int8 balanced accuracy{at} {q:.4f} vs float {f:.4f} ({-drop:+.2f} points, limit -{max_drop_points:.2f})"
    ]
    if auc_drop is not None and float_auc is not None and int8_auc is not None:
        parts.append(f"ROC AUC {int8_auc:.4f} vs {float_auc:.4f} ({-auc_drop:+.4f}, limit -{max_auc_drop:.3f})")
    message = "; ".join(parts)
    if within:
        message += ": passed"
    else:
        where = f"the bundle in {out_dir}" if out_dir is not None else "the bundle"
        failed = " and ".join(
            name for name, ok in (("balanced accuracy", within_ba), ("ROC AUC", within_auc)) if not ok
        )
        message += f": int8 loses too much {failed}; " + (
            "accepted because of --allow-quantization-drop"
            if allow
            else f"{where} is marked as failing the gate: train longer or on more images, "
            "or pass --allow-quantization-drop to accept it"
        )
    return {
        "passed": within or allow,
        "drop_points": round(drop, 4),
        "max_drop_points": max_drop_points,
        "auc_drop": auc_drop,
        "max_auc_drop": max_auc_drop,
        "allowed_by_flag": bool(allow and not within),
        "metric": "balanced_accuracy at the shipped threshold, and roc_auc",
        "message": message,
    }


def _selection_scores(
    opts: FitOptions,
    data: DataReport,
    split: Split,
    fx: dict[str, np.ndarray],
    model_ys: dict[str, np.ndarray],
    masks_train: np.ndarray,
    mask_known: np.ndarray,
    groups: Any,
    trained: Any,
    config: Any,
    model_labels: list[str],
    say: Echo,
) -> OperatingScores:
    """Float scores of images the scoring model did not train on, to choose the operating point.

    The final model's validation scores when validation holds MIN_VALIDATION_DEFECTS defects
    or more (or ``opts.folds`` is 0); else out-of-fold scores over train and validation
    (:mod:`training.folds`), from fold models trained with the final model's recipe.
    """
    from training import model as model_mod

    model_pass = model_labels.index(data.pass_label)
    n_val_defects = int(np.sum(model_ys["val"] != model_pass))
    if opts.folds == 0 or n_val_defects >= MIN_VALIDATION_DEFECTS:
        probs = model_mod.predict_proba(trained.model, fx["val"])
        return OperatingScores(
            scores_from="validation",
            model="float",
            pass_label=data.pass_label,
            files=tuple(str(s.path) for s in split.val),
            labels=tuple(s.label for s in split.val),
            scores=_scores(probs, model_pass),
        )
    from training.folds import out_of_fold_scores

    pool = split.train + split.val
    x = np.concatenate([fx["train"], fx["val"]])
    y = np.concatenate([model_ys["train"], model_ys["val"]])
    masks_val, known_val = load_masks(split.val, data.masks, fx["val"], data.pass_label)
    say(
        f"operating point: validation has {n_val_defects} defects (< {MIN_VALIDATION_DEFECTS}), so {opts.folds} fold "
        f"models score all {int(np.sum(y != model_pass))} training and validation defects out of fold "
        "(each with the final model's recipe, its own validation share choosing its epoch)"
    )
    scores = out_of_fold_scores(
        x,
        y,
        y != model_pass,
        config,
        len(model_labels),
        folds=opts.folds,
        pass_index=model_pass,
        masks=np.concatenate([masks_train, masks_val]),
        mask_known=np.concatenate([mask_known, known_val]),
        groups=[groups(s) for s in pool] if groups else None,
        say=say,
    )
    return OperatingScores(
        scores_from=f"out-of-fold ({opts.folds} folds)",
        model="float",
        pass_label=data.pass_label,
        files=tuple(str(s.path) for s in pool),
        labels=tuple(s.label for s in pool),
        scores=scores,
    )


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else image[:, :, None]


def _tiles_info(crops: PoolCrops) -> dict[str, Any]:
    """How the training crops were made, for the manifest (training/tiles.py has the rules)."""
    from training import tiles as tiles_mod

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
    }


def _int8_scorer(clf: Classifier) -> Callable[[np.ndarray], np.ndarray]:
    """One frame's model inputs through the agent's own steps: lookup table, one invoke."""
    return lambda inputs: clf.scores(clf.invoke_batch(clf.quantize_inputs(inputs)))


def _one_by_one(invoke: Callable[[np.ndarray], Any]) -> Callable[[np.ndarray], None]:
    """A frame's uint8 inputs through a float model that takes one input per invoke."""

    def run(inputs: np.ndarray) -> None:
        for one in inputs:
            invoke(one[None, ...].astype(np.float32) / 255.0)

    return run


def _float_scorer(model: Any, pass_class: int) -> Callable[[np.ndarray], np.ndarray]:
    """Model inputs (uint8) -> float defect scores, for :func:`training.tiles.picture_scores`."""
    from training import model as model_mod

    return lambda inputs: _scores(model_mod.predict_proba(model, inputs), pass_class)


def _train_on_crops(
    crops: PoolCrops,
    fit_pictures: np.ndarray,
    val_pictures: np.ndarray,
    config: Any,
    num_classes: int,
    *,
    on_epoch: Callable[[Any], None] | None = None,
    say: Echo = lambda line: None,
) -> Any:
    """Train on the crops of ``fit_pictures``, early-stopping on those of ``val_pictures``,
    for two thirds of the epochs, then the last third from the first round's weights, with each
    picture's highest-scoring tile added: good pictures' as hard negatives, mask-less defect
    pictures' as their defect (training/tiles.py).
    """
    from training import model as model_mod

    first_epochs = max(1, round(config.epochs * 2 / 3))
    first = dataclasses.replace(config, epochs=first_epochs, min_epochs=min(config.min_epochs, first_epochs))
    again = dataclasses.replace(config, epochs=max(1, config.epochs - first_epochs), min_epochs=1)
    fit_set, val_set = crops.of(fit_pictures), crops.of(val_pictures)
    trained = model_mod.train_model(
        fit_set.x, fit_set.y, val_set.x, val_set.y, num_classes, first,
        masks_train=fit_set.masks, mask_known=fit_set.known, pass_index=crops.pass_class, on_epoch=on_epoch,
    )
    score = _float_scorer(trained.model, crops.pass_class)

    def worst_tiles(pictures: np.ndarray) -> np.ndarray:
        return np.concatenate([crops.good_among(pictures), crops.unmasked_among(pictures)])

    fit_set = join(fit_set, crops.best_tiles(worst_tiles(fit_pictures), score))
    val_set = join(val_set, crops.best_tiles(worst_tiles(val_pictures), score))
    say(
        f"  second round, {again.epochs} epochs: each good training picture's highest-scoring tile as a good crop"
        + (f", each of {len(crops.unmasked_among(fit_pictures))} mask-less defect pictures' as a defect crop"
           if crops.unmasked_among(fit_pictures).size else "")
    )
    return model_mod.train_model(
        fit_set.x, fit_set.y, val_set.x, val_set.y, num_classes, again,
        masks_train=fit_set.masks, mask_known=fit_set.known, pass_index=crops.pass_class,
        on_epoch=(lambda log: on_epoch(dataclasses.replace(log, epoch=log.epoch + first_epochs))) if on_epoch else None,
        initial=trained,
    )


def _tiled_selection_scores(
    opts: FitOptions,
    data: DataReport,
    crops: PoolCrops,
    groups: Any,
    trained: Any,
    config: Any,
    model_labels: list[str],
    say: Echo,
) -> tuple[OperatingScores, RuleChoice]:
    """:func:`_selection_scores` for a tiled model, and the decision rule chosen on the same
    held-out pictures (training/tiles.py ``choose_rule``): each picture's score is the rule
    over its model inputs, cut as the box cuts them."""
    from training.folds import out_of_fold

    pass_class = crops.pass_class
    val_pictures = np.arange(crops.n_train, len(crops.samples))
    n_val_defects = int(np.sum(crops.classes[val_pictures] != pass_class))
    if opts.folds == 0 or n_val_defects >= MIN_VALIDATION_DEFECTS:
        held_samples: Sequence[Any] = crops.samples[crops.n_train :]
        is_defect = crops.classes[val_pictures] != pass_class
        parts = picture_parts(held_samples, crops.tiling, crops.color_mode, _float_scorer(trained.model, pass_class))
        scores_from = "validation"
    else:
        held_samples = crops.samples
        is_defect = crops.classes != pass_class
        say(
            f"operating point: validation has {n_val_defects} defects (< {MIN_VALIDATION_DEFECTS}), so {opts.folds} fold "
            f"models score all {int(np.sum(is_defect))} training and validation defect pictures out of fold"
        )

        def train_and_score(fit_idx: np.ndarray, val_idx: np.ndarray, hold_idx: np.ndarray, fold_config: Any) -> tuple[np.ndarray, Any]:
            fold = _train_on_crops(crops, fit_idx, val_idx, fold_config, len(model_labels))
            held = [crops.samples[i] for i in hold_idx]
            return picture_parts(held, crops.tiling, crops.color_mode, _float_scorer(fold.model, pass_class)), fold

        parts = out_of_fold(
            crops.classes, is_defect, config, train_and_score, folds=opts.folds,
            groups=[groups(s) for s in crops.samples] if groups else None, say=say,
        )
        scores_from = f"out-of-fold ({opts.folds} folds)"
    rule = choose_rule(parts, is_defect, crops.tiling)
    say(rule.describe())
    selection = OperatingScores(
        scores_from=scores_from,
        model="float",
        pass_label=data.pass_label,
        files=tuple(str(s.path) for s in held_samples),
        labels=tuple(s.label for s in held_samples),
        scores=rule_scores(parts, rule.tiling),
    )
    return selection, rule


def fit(data_dir: Path, out_dir: Path, options: FitOptions | None = None, *, echo: Echo | None = None) -> FitResult:
    """Train, quantize, evaluate and write a bundle to ``out_dir``; see the module docstring.

    Raises :class:`training.exceptions.DataError` for data it cannot train on and
    :class:`QuantizationGateError` (after writing the bundle, whose manifest records the
    failed gate) when int8 loses too much against float.
    """
    opts = options or FitOptions()
    say: Echo = echo or (lambda line: logger.info("%s", line))
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    t_start = time.perf_counter()
    durations: dict[str, float] = {}
    bundle_mod.check_out_dir(out_dir)

    # 1-2. Data check and split.
    t0 = time.perf_counter()
    data = scan_dataset(data_dir, pass_label=opts.pass_label, min_per_class=opts.min_per_class, masks_dir=opts.masks)
    for line in data.summary_lines():
        say(line)
    groups = number_groups(data.samples, gap=opts.group_gap) if opts.group_by == "number" else None
    split = split_dataset(data.samples, seed=opts.seed, fractions=opts.fractions, groups=groups)
    say(
        f"split ({split.method}, seed {opts.seed}): "
        + ", ".join(f"{k} {v}" for k, v in split.sizes().items())
        + (f", {len({groups(s) for s in data.samples})} groups" if groups else "")
    )
    if min(split.sizes().values()) == 0:
        raise TrainingError("a split came out empty; add images (each class needs at least 10)")

    tiling = opts.tiling
    if tiling is not None:
        check_pictures(data.samples, tiling)  # every picture must hold a tile: fail before training
    width, height = opts.model_tile
    prep = Preprocessing(color_mode=opts.color_mode, width=width, height=height, interpolation=opts.interpolation)  # type: ignore[arg-type]
    labels = data.labels
    pass_index = labels.index(data.pass_label)
    ys = {name: label_indices(getattr(split, name), labels) for name in ("train", "val", "test")}
    # What the network outputs: the class folders, or pass vs defect (index 0 = pass).
    merged = opts.defects == "merged" and len(labels) > 2
    model_labels = [data.pass_label, MERGED_DEFECT_LABEL] if merged else list(labels)
    model_ys = {name: (y != pass_index).astype(np.int64) for name, y in ys.items()} if merged else ys
    model_pass = model_labels.index(data.pass_label)
    if tiling is None:
        raw_x = {name: load_arrays(getattr(split, name), prep) for name in ("train", "val", "test")}
        fx = {name: to_float(arr, prep) for name, arr in raw_x.items()}
        masks_train, mask_known = load_masks(split.train, data.masks, raw_x["train"], data.pass_label)
        crops: PoolCrops | None = None
    else:
        crops = PoolCrops.build(split, model_ys, model_pass, data.masks, tiling, opts.color_mode, opts.seed)
        say(f"tiles: {crops.describe()}")
        train_crops, val_crops = crops.of_train(), crops.of_val()
        # Crops stay uint8 (training converts each batch); "test" is scored picture by picture.
        raw_x = {"train": train_crops.x, "val": val_crops.x}
        fx = dict(raw_x)
        model_ys = {**model_ys, "train": train_crops.y, "val": val_crops.y}
        masks_train, mask_known = train_crops.masks, train_crops.known
    durations["data"] = time.perf_counter() - t0

    epochs = opts.epochs or auto_epochs(len(model_ys["train"]))  # crops, for a tiled fit

    # 3. Train (TensorFlow is imported only from here on, without its start-up lines).
    native.import_quietly("tensorflow")
    from training import export as export_mod
    from training import model as model_mod

    config = model_mod.TrainConfig(
        epochs=epochs,
        min_epochs=max(1, epochs // 2),
        batch_size=opts.batch_size,
        learning_rate=opts.learning_rate,
        patience=opts.patience,
        seed=opts.seed,
        width=opts.filters,
        stem=opts.stem,
        shading=opts.shading,
        label_smoothing=opts.label_smoothing,
        map_clip=(None if tiling else 6.0) if opts.map_clip == "auto" else opts.map_clip,  # type: ignore[arg-type]
        augmentation=model_mod.Augmentation() if opts.augment else model_mod.Augmentation(False, False, 0.0, 0.0, 0.0),
    )
    say(
        f"training: {width}x{height} {opts.color_mode}{' tiles' if tiling else ''}, up to {epochs} epochs{'' if opts.epochs else ' (auto)'}, batch {opts.batch_size}, "
        f"lr {opts.learning_rate}, class-weighted loss (imbalance {data.imbalance:.1f}:1)"
        + (f", outputs {model_labels[0]} / {MERGED_DEFECT_LABEL} (defect classes merged)" if merged else "")
    )
    n_masked = int(np.sum(mask_known & (model_ys["train"] != model_pass)))
    if n_masked:
        say(f"  defect masks for {n_masked} of {int(np.sum(model_ys['train'] != model_pass))} training "
            f"{'defect crops' if tiling else 'defects'}: the defect map learns from them")

    def on_epoch(log: Any) -> None:
        say(
            f"  epoch {log.epoch:>3}/{epochs}  loss {log.loss:.4f}  acc {log.accuracy:.3f}  "
            + (f"map_loss {log.map_loss:.4f}  " if log.map_loss is not None else "")
            + f"val_loss {log.val_loss:.4f}  val_bal_acc {log.val_accuracy:.3f}  {log.seconds:5.1f}s"
            + ("  *" if log.best else "")
        )

    t_train = time.perf_counter()
    if crops is None:
        trained = model_mod.train_model(
            fx["train"],
            model_ys["train"],
            fx["val"],
            model_ys["val"],
            len(model_labels),
            config,
            masks_train=masks_train,
            mask_known=mask_known,
            pass_index=model_pass,
            on_epoch=on_epoch,
        )
    else:
        trained = _train_on_crops(
            crops, np.arange(crops.n_train), np.arange(crops.n_train, len(crops.samples)), config,
            len(model_labels), on_epoch=on_epoch, say=say,
        )
    say(f"  best epoch {trained.best_epoch} of {trained.epochs_run} (weights restored), {trained.seconds:.0f}s")

    durations["train"] = time.perf_counter() - t_train

    # The operating point's scores: validation, or out-of-fold when it has few defects.
    t0 = time.perf_counter()
    if crops is None:
        selection = _selection_scores(
            opts, data, split, fx, model_ys, masks_train, mask_known, groups, trained, config, model_labels, say
        )
        rule: RuleChoice | None = None
    else:
        selection, rule = _tiled_selection_scores(opts, data, crops, groups, trained, config, model_labels, say)
        crops = dataclasses.replace(crops, tiling=rule.tiling)
    float_point = selection.choose(opts.target_recall, opts.max_false_reject)
    # Move the chosen cut to the middle of the output range, where int8 resolves it best. A
    # fused rule adds the whole view's logit with its weight, so it moves (1 + weight) times.
    gain = 1.0 + (rule.tiling.whole_weight if rule is not None and rule.tiling.rule == "fused" else 0.0)
    cut = float(np.clip(float_point.threshold, 1e-4, 1 - 1e-4))
    shift = model_mod.move_operating_point(trained.model, 1.0 / (1.0 + ((1 - cut) / cut) ** (1.0 / gain)), model_pass)
    selection = selection.shifted(shift * gain)
    if shift:
        say(f"  operating point moved to the middle of the output range (defect logit {shift:+.2f})")
    durations["operating_scores"] = time.perf_counter() - t0

    # 4. Quantize.
    t0 = time.perf_counter()
    representative = model_mod.as_float(export_mod.representative_subset(fx["train"], seed=opts.seed))
    int8_bytes = export_mod.convert_int8(trained.model, representative)
    float_bytes = export_mod.convert_float(trained.model)
    in_spec, out_spec = export_mod.tensor_specs(int8_bytes)
    durations["quantize"] = time.perf_counter() - t0
    say(
        f"quantized: int8 {len(int8_bytes) / 1024:.1f} KiB (float32 {len(float_bytes) / 1024:.1f} KiB), "
        f"calibrated on {len(representative)} training images; input scale {in_spec.scale:.6g} zero point {in_spec.zero_point}"
    )

    # 5. Evaluate: a provisional bundle lets the edge's Classifier load the int8 model.
    t0 = time.perf_counter()
    staging = bundle_mod.staging_dir(out_dir)
    try:
        result = _finish(
            staging=staging,
            out_dir=out_dir,
            opts=opts,
            data=data,
            split=split,
            prep=prep,
            raw_x=raw_x,
            fx=fx,
            ys=ys,
            pass_index=pass_index,
            model_labels=model_labels,
            trained=trained,
            config=config,
            crops=crops,
            rule=rule,
            shift=shift,
            selection=selection,
            int8_bytes=int8_bytes,
            float_bytes=float_bytes,
            in_spec=in_spec,
            out_spec=out_spec,
            representative_n=len(representative),
            durations=durations,
            t_eval=t0,
            t_start=t_start,
            say=say,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not result.gate_passed:
        raise QuantizationGateError(result.manifest["metrics"]["quantization_gate"]["message"])
    return result


def _finish(
    *,
    staging: Path,
    out_dir: Path,
    opts: FitOptions,
    data: DataReport,
    split: Split,
    prep: Preprocessing,
    raw_x: dict[str, np.ndarray],
    fx: dict[str, np.ndarray],
    ys: dict[str, np.ndarray],
    pass_index: int,
    model_labels: list[str],
    trained: Any,
    shift: float,
    selection: OperatingScores,
    config: Any,
    crops: PoolCrops | None,
    rule: RuleChoice | None,
    int8_bytes: bytes,
    float_bytes: bytes,
    in_spec: Any,
    out_spec: Any,
    representative_n: int,
    durations: dict[str, float],
    t_eval: float,
    t_start: float,
    say: Echo,
) -> FitResult:
    import tensorflow as tf

    from training import export as export_mod
    from training import model as model_mod

    labels = data.labels
    pass_label = data.pass_label
    (staging / MODEL_FILE).write_bytes(int8_bytes)
    report_dir = staging / REPORT_DIR
    (report_dir / bundle_mod.FLOAT_MODEL_FILE).write_bytes(float_bytes)
    input_spec = {"shape": list(in_spec.shape), "dtype": in_spec.dtype, "scale": in_spec.scale, "zero_point": in_spec.zero_point}
    output_spec = {"shape": list(out_spec.shape), "dtype": out_spec.dtype, "scale": out_spec.scale, "zero_point": out_spec.zero_point}
    name = opts.name or _default_name(data.data_dir)
    version = opts.version or bundle_mod.default_version()
    created = bundle_mod.utc_now()
    common: dict[str, Any] = {
        "bundle_dir": staging,
        "name": name,
        "version": version,
        "labels": model_labels,
        "pass_label": pass_label,
        "input_spec": input_spec,
        "output_spec": output_spec,
        "preprocessing": prep.model_dump(),
        "created": created,
        "tiling": crops.tiling.model_dump() if crops is not None else None,
    }
    bundle_mod.write_manifest(
        staging,
        bundle_mod.build_manifest(threshold=0.5, metrics={}, dataset={}, training={}, reference={}, **common),
    )
    with export_mod.quiet_native_output():  # the runtime announces its delegate on stderr
        clf = Classifier(staging)

    true = {name: [labels[i] for i in ys[name]] for name in ("val", "test")}
    is_defect = {name: ys[name] != pass_index for name in ("val", "test")}
    # int8, through the edge classifier: threshold on val, metrics on test.
    tiling = crops.tiling if crops is not None else None
    if tiling is None:
        int8_val, _, _ = _int8_scores(clf, raw_x["val"])
        int8_test, _, _ = _int8_scores(clf, raw_x["test"])
    else:
        int8_frame = _int8_scorer(clf)
        int8_val = picture_scores(split.val, tiling, prep.color_mode, int8_frame, batch=1)
        int8_test = picture_scores(split.test, tiling, prep.color_mode, int8_frame, batch=1)
    # The shipped point: on the int8 model's own validation scores, or on the fold models'
    # out-of-fold scores (float, moved into the shipped model's scale).
    shipped_scores = (
        dataclasses.replace(selection, scores=int8_val, model="int8") if selection.scores_from == "validation" else selection
    )
    point = shipped_scores.choose(opts.target_recall, opts.max_false_reject)
    int8_metrics = compute_metrics(true["test"], int8_test, pass_label, point.threshold)
    # float (the Keras model), judged the same way at its own point.
    model_pass = model_labels.index(pass_label)
    if tiling is None:
        float_test = _scores(model_mod.predict_proba(trained.model, fx["test"]), model_pass)
    else:
        float_test = picture_scores(split.test, tiling, prep.color_mode, _float_scorer(trained.model, model_pass))
    float_point = selection.choose(opts.target_recall, opts.max_false_reject)
    float_metrics = compute_metrics(true["test"], float_test, pass_label, float_point.threshold)

    # Latency: int8 through the classifier and the float twin, same runtime, one thread each.
    with export_mod.quiet_native_output():
        lat_clf = Classifier(staging, num_threads=1)
    float_runner = export_mod.FloatTFLite(float_bytes, num_threads=1, runtime=lat_clf.runtime)
    if tiling is None:
        batches_u8 = [clf.quantize(img) for img in raw_x["test"][:50]]
        int8_latency = _latency(lat_clf.invoke, batches_u8, opts.latency_samples)
        float_latency = _latency(float_runner.invoke, [x[None, ...] for x in fx["test"][:50]], opts.latency_samples)
    else:
        # per frame: all of a frame's model inputs (the float twin takes them one by one)
        frames = [inputs for _, inputs in picture_inputs(split.test[:5], tiling, prep.color_mode)]
        int8_latency = _latency(lat_clf.invoke_batch, [lat_clf.quantize_inputs(f) for f in frames], min(opts.latency_samples, 40))
        float_latency = _latency(_one_by_one(float_runner.invoke), frames, min(opts.latency_samples, 5))
    latency = {"runtime": lat_clf.runtime, "num_threads": 1, "int8": int8_latency, "float32": float_latency}
    latency_budget = round(max(20.0, 10.0 * int8_latency["p99_ms"]), 3)
    durations["evaluate"] = time.perf_counter() - t_eval

    # The gate compares the two models at the threshold the bundle ships: what quantization
    # does to the line's decisions. Each at its own 99 %-recall validation threshold (the
    # float/int8 columns of the report) the difference is mostly the noise of picking the
    # k-th highest of a few hundred defect scores on a steep part of the ROC: the default
    # synthetic fit had equal int8 and float ROC AUC (0.9596 / 0.9593) and "lost" 4.2 points.
    float_at_shipped = compute_metrics(true["test"], float_test, pass_label, point.threshold)
    gate = quantization_gate(
        float_at_shipped["balanced_accuracy"],
        int8_metrics["balanced_accuracy"],
        opts.max_quantization_drop,
        allow=opts.allow_quantization_drop,
        out_dir=out_dir,
        threshold=point.threshold,
        float_auc=float_metrics["roc_auc"],
        int8_auc=int8_metrics["roc_auc"],
    )
    gate["threshold"] = point.threshold
    gate["float_balanced_accuracy_at_own_threshold"] = float_metrics["balanced_accuracy"]
    gate_message = gate["message"]

    # Golden images from the test split, expected outputs through the classifier on the PNG files.
    test_labels = true["test"]
    if tiling is None:
        picked = bundle_mod.select_golden(test_labels, opts.golden_per_class)
        golden_images = [raw_x["test"][i] for i in picked]
    else:  # whole frames (one per class: camera frames make large PNGs)
        picked = bundle_mod.select_golden(test_labels, min(1, opts.golden_per_class))
        golden_images = [_as_hwc(to_color_mode(read_image(split.test[i].path), prep.color_mode)) for i in picked]
    golden_entries = bundle_mod.write_golden(staging, golden_images, [test_labels[i] for i in picked], prep.color_mode)
    golden = bundle_mod.golden_expectations(clf, golden_entries)

    reference = bundle_mod.reference_statistics(raw_x["train"], int8_val, true["val"], labels)
    durations["total"] = time.perf_counter() - t_start
    metrics = {
        "split": "test",
        "float": float_metrics,
        "int8": int8_metrics,
        "float_operating_point": float_point.to_manifest(),
        "quantization_gate": gate,
        "latency": latency,
        "runtime": clf.runtime,
    }
    dataset = {
        "fingerprint": data.fingerprint,
        "class_counts": dict(data.class_counts),
        "images": len(data.samples),
        "unreadable_skipped": len(data.unreadable),
        "duplicates_removed": len(data.duplicates),
        "split": split.to_dict() | ({"group_by": opts.group_by, "group_gap": opts.group_gap} if opts.group_by != "none" else {}),
        "warnings": list(data.warnings),
    }
    training_info = {
        "epochs": config.epochs,
        "epochs_chosen": "given" if opts.epochs else f"auto: ceil({AUTO_EPOCH_IMAGES} / training images) in {list(AUTO_EPOCHS_RANGE)}",
        "epochs_run": trained.epochs_run,
        "best_epoch": trained.best_epoch,
        "stopped_early": trained.stopped_early,
        "seed": opts.seed,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "lr_schedule": "cosine per epoch to 5 %",
        "patience": config.patience,
        "early_stopping": "val loss (class-weighted), best weights restored",
        "class_weighting": "balanced (n / (classes x n_class))",
        "operating_point_shift": round(shift, 4),
        "outputs": "pass vs defect (defect classes merged)" if len(model_labels) < len(labels) else "one per class folder",
        "augmentation": config.augmentation.to_dict(),
        "architecture": model_mod.model_summary(trained.model) | {"filters": config.width, "head": trained.head, "stem": config.stem, "shading": config.shading},
        **({"tiles": _tiles_info(crops) | ({"decision_rule": rule.to_dict()} if rule else {})} if crops is not None else {}),
        "masks": {
            "used": trained.used_masks,
            "train_images_with_defect_mask": trained.masked_images,
            "mask_weight": config.mask_weight,
            "mask_pos_weight": config.mask_pos_weight,
        },
        "parameters": int(trained.model.count_params()),
        "representative_images": representative_n,
        "quantization": "full-integer int8 post-training (TFLITE_BUILTINS_INT8, int8 input and output)",
        "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "tf_version": tf.__version__,
        "keras_version": __import__("keras").__version__,
        "history": [asdict(h) for h in trained.history],
    }
    manifest = bundle_mod.build_manifest(
        threshold=point.threshold,
        operating_point=point.to_manifest(),
        metrics=metrics,
        dataset=dataset,
        training=training_info,
        reference=reference,
        golden=golden,
        latency_budget_ms=latency_budget,
        **common,
    )
    bundle_mod.write_manifest(staging, manifest)

    # Report for people.
    (report_dir / SCORES_FILE).write_text(json.dumps(shipped_scores.to_json()) + "\n", encoding="utf-8")
    report.plot_confusion(int8_metrics["confusion"], pass_label, report_dir / "confusion.png",
                          f"int8 on test, threshold {point.threshold:.3f}")
    report.plot_operating_point(shipped_scores, point, (is_defect["test"], int8_test), report_dir)
    curves = {"float32": (is_defect["test"], float_test), "int8": (is_defect["test"], int8_test)}
    points = {
        "float32": (float_metrics["false_reject_rate"] or 0.0, float_metrics["defect_recall"] or 0.0),
        "int8": (int8_metrics["false_reject_rate"] or 0.0, int8_metrics["defect_recall"] or 0.0),
    }
    report.plot_roc(curves, points, report_dir / "roc.png", "ROC on test (dot: chosen threshold)")
    report.plot_pr(curves, report_dir / "pr.png", "Precision-recall on test (defects positive)")
    (report_dir / "metrics.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": version,
                "metrics": metrics,
                "data_check": data.to_dict(),
                "split": split.to_dict(),
                "training": training_info,
                "float_model": {"file": f"{REPORT_DIR}/{bundle_mod.FLOAT_MODEL_FILE}", "bytes": len(float_bytes)},
                "test_scores": {
                    "pass_label": pass_label,
                    "files": [str(s.path) for s in split.test],
                    "labels": true["test"],
                    "int8": [round(float(v), 6) for v in int8_test],
                    "float": [round(float(v), 6) for v in float_test],
                },
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    (report_dir / "model_card.md").write_text(
        report.model_card(
            manifest,
            {
                "data_dir": str(data.data_dir),
                "warnings": list(data.warnings),
                "runtime": clf.runtime,
                "gate_message": gate_message,
            },
        ),
        encoding="utf-8",
    )
    del clf, lat_clf, float_runner
    with export_mod.quiet_native_output():
        bundle_mod.verify_bundle(staging)
    final = bundle_mod.install_bundle(staging, out_dir)

    say("evaluation on the test split (each model at its validation threshold):")
    for line in report.metrics_table(float_metrics, int8_metrics):
        say("  " + line)
    for line in report.operating_point_lines(point):
        say(line)
    say(
        f"latency ({latency['runtime']}, 1 thread): int8 p50 {int8_latency['p50_ms']:.3f} ms, p99 {int8_latency['p99_ms']:.3f} ms; "
        f"float32 p50 {float_latency['p50_ms']:.3f} ms; budget {latency_budget} ms"
    )
    say(f"quantization gate: {gate_message}")
    say(f"bundle: {final} ({name} {version}); report: {final / REPORT_DIR}")
    return FitResult(
        bundle_dir=final,
        manifest=manifest,
        float_metrics=float_metrics,
        int8_metrics=int8_metrics,
        operating_point=point,
        gate_passed=bool(gate["passed"]),
        seconds=time.perf_counter() - t_start,
        durations=durations,
    )


__all__ = ["AUTO_EPOCH_IMAGES", "DEFAULT_FILTERS", "DEFAULT_SIZE", "FitOptions", "FitResult", "auto_epochs", "fit", "quantization_gate"]
