"""``linewatch train fit`` end to end: data check -> split -> train -> int8 -> evaluate -> bundle.

:func:`fit` runs these stages in order, each handing the next a small dataclass:

1. :func:`prepare_data` -> :class:`PreparedData`: :func:`training.dataset.scan_dataset`
   verifies DATA_DIR and fingerprints it; a stratified (optionally grouped) train/val/test
   split, seeded; the model-size arrays, or a tiled fit's crops (:mod:`training.tiles`).
2. :func:`train` -> :class:`TrainedModel`: the CNN trains on train, early-stopping on val
   loss (:mod:`training.model`). The operating point's scores (:mod:`training.operating_point`)
   come from validation, or from out-of-fold models (:mod:`training.folds`) when validation
   holds few defects; a tiled fit chooses its decision rule on the same scores. The float
   cut is moved to the middle of the output range before the export.
3. :func:`quantize` -> :class:`QuantizedModel`: full-integer int8 conversion calibrated on
   training images, plus a float32 twin.
4. :func:`evaluate` -> :class:`training.evaluate.Evaluation`: the shipped cut is chosen
   again on the int8 model through :class:`edge.inference.Classifier`, the agent's code;
   the test split is scored once, by both the float and the int8 model; latency; the
   quantization gate: at the shipped threshold, int8 balanced accuracy on test may be at
   most ``max_quantization_drop`` points below float's, and its ROC AUC at most 0.005
   lower, unless ``allow_quantization_drop``.
5. :func:`write_bundle`: golden images, reference statistics, manifest
   (:mod:`training.bundle`) and report (:mod:`training.report`); the bundle is verified by
   loading it as the edge does and moved into ``out_dir``.
6. :func:`print_summary`: the test metrics, the operating point, latency and the gate.

Imports TensorFlow (through :mod:`training.model`): import it inside commands only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge.inference import Classifier
from edge.preprocess import quantize_lut, read_image, to_color_mode, to_float
from edge.protocol import MODEL_FILE, REPORT_DIR, Preprocessing, Tiling
from edge.tiling import MIN_TILE, rule_scores
from training import bundle as bundle_mod
from training import native, report
from training.dataset import (
    DataReport,
    GroupFn,
    Sample,
    Split,
    content_groups,
    label_indices,
    load_arrays,
    load_masks,
    number_groups,
    scan_dataset,
    split_dataset,
)
from training.evaluate import Evaluation, compute_metrics
from training.exceptions import QuantizationGateError, TrainingError
from training.operating_point import (
    DEFAULT_FOLDS,
    DEFAULT_MAX_FALSE_REJECT,
    DEFAULT_TARGET_RECALL,
    MIN_VALIDATION_DEFECTS,
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

# training.model and training.export import TensorFlow, which fit() imports only after the
# data check: their types are imported for the checker alone, and Keras models are typed Any.
if TYPE_CHECKING:
    from training.export import TensorSpec
    from training.model import EpochLog, TrainConfig, TrainResult

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]
DEFAULT_SIZE = 128
# First-layer filters (later blocks 2x-8x): 16 ranks defects better than 8 for about the
# same int8 invoke time on the box (docs/training.md, "Model" and "Benchmark").
DEFAULT_FILTERS = 16
# Without --epochs a fit gets about this many training-image passes, whatever the data size
# (docs/training.md, "Defect masks", on training).
AUTO_EPOCH_IMAGES = 112_000
AUTO_EPOCHS_RANGE = (10, 60)


# Without --size, a whole-picture fit on a small set of large pictures learns at 192 px:
# thin and faint defects keep more pixels (magnetic tiles: held-out ROC AUC crack 0.993 ->
# 1.000, uneven 0.889 -> 0.961; docs/benchmarks.md), and at auto epochs such a set costs no
# more pixel passes than AUTO_EPOCH_IMAGES at 128 px (at most about 830 training pictures).
LARGE_SIZE = 192
_SIZE_PROBE = 64  # pictures whose sizes stand for the set's


def auto_size(n_train: int, short_side: float) -> int:
    """The whole-picture model input for ``n_train`` training pictures whose median shorter
    side is ``short_side`` pixels, when --size is not given."""
    cost = n_train * auto_epochs(n_train) * LARGE_SIZE**2
    return LARGE_SIZE if short_side >= LARGE_SIZE and cost <= AUTO_EPOCH_IMAGES * DEFAULT_SIZE**2 else DEFAULT_SIZE


def _median_short_side(samples: Sequence[Sample]) -> float:
    """Median shorter side of up to _SIZE_PROBE of the pictures (spread over the set)."""
    step = max(1, len(samples) // _SIZE_PROBE)
    return float(np.median([min(read_image(s.path).shape[:2]) for s in samples[::step][:_SIZE_PROBE]]))


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
    # True (the CLI without --size): a whole-picture fit picks ``size`` from the data (auto_size).
    size_from_data: bool = False
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
    group_by: str = "none"  # "none", "number" or "content" (training.dataset.number_groups, content_groups)
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
    # Defect transplant (training/transplant.py): new defect inputs per masked defect input,
    # or "auto" (top a few dozen masked defects up; none where a set has hundreds).
    transplant: float | str = "auto"

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
        if self.group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
        if self.stem not in ("pool", "strided"):
            raise ValueError(f"stem must be 'pool' or 'strided', got {self.stem!r}")
        if self.defects not in ("merged", "separate"):
            raise ValueError("defects must be 'merged' or 'separate'")
        if self.transplant != "auto" and not (isinstance(self.transplant, (int, float)) and 0.0 <= self.transplant <= 16.0):
            raise ValueError(f"transplant must be 'auto' or a number in [0, 16], got {self.transplant!r}")
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


@dataclass(frozen=True)
class PreparedData:
    """The checked, split data as the network sees it (:func:`prepare_data`)."""

    data: DataReport
    split: Split
    groups: GroupFn | None  # files that must share a split and a fold (``--group-by``)
    prep: Preprocessing
    ys: dict[str, np.ndarray]  # class-folder index per image of each split
    model_labels: list[str]  # the network's outputs: the class folders, or pass vs defect
    # Training targets per split in model_labels' order: the crops' for a tiled fit's train and val.
    model_ys: dict[str, np.ndarray]
    # uint8 model inputs: train and val (crops for a tiled fit), and test for whole pictures;
    # fx holds the same as float in [0, 1] (crops stay uint8: training converts each batch).
    raw_x: dict[str, np.ndarray]
    fx: dict[str, np.ndarray]
    masks_train: np.ndarray  # defect coverage per training input
    mask_known: np.ndarray  # whether each training input's mask is known
    crops: PoolCrops | None  # a tiled fit's crops
    options: FitOptions  # the fit's options, with what the data decided (the input size) filled in

    @property
    def pass_index(self) -> int:
        """The pass class among the class folders."""
        return self.data.labels.index(self.data.pass_label)

    @property
    def model_pass(self) -> int:
        """The pass class among the network's outputs."""
        return self.model_labels.index(self.data.pass_label)

    @property
    def merged(self) -> bool:
        """Whether the defect classes share one output."""
        return len(self.model_labels) < len(self.data.labels)


@dataclass(frozen=True)
class TrainedModel:
    """The trained network, its operating point moved to mid-range (:func:`train`)."""

    config: TrainConfig
    result: TrainResult
    # Held-out float scores that choose the operating point, in the moved model's scale.
    selection: OperatingScores
    shift: float  # the defect logit's shift (training.model.move_operating_point)
    rule: RuleChoice | None  # a tiled fit's decision rule

    @property
    def model(self) -> Any:
        return self.result.model

    @property
    def tiling(self) -> Tiling | None:
        """A tiled fit's tiling with its decision rule; None for whole pictures."""
        return self.rule.tiling if self.rule is not None else None


@dataclass(frozen=True)
class QuantizedModel:
    """The int8 model that ships and its float32 twin (:func:`quantize`)."""

    int8_bytes: bytes
    float_bytes: bytes
    input_spec: TensorSpec
    output_spec: TensorSpec
    representative_images: int  # training images that calibrated the int8 ranges


@dataclass
class Stopwatch:
    """Seconds per stage, in the order they ran (the manifest's ``training.durations_s``)."""

    start: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def fit(data_dir: Path, out_dir: Path, options: FitOptions | None = None, *, echo: Echo | None = None) -> FitResult:
    """Train, quantize, evaluate and write a bundle to ``out_dir``; see the module docstring.

    Raises :class:`training.exceptions.DataError` for data it cannot train on and
    :class:`QuantizationGateError` (after writing the bundle, whose manifest records the
    failed gate) when int8 loses too much against float.
    """
    opts = options or FitOptions()
    say: Echo = echo or (lambda line: logger.info("%s", line))
    out_dir = Path(out_dir)
    clock = Stopwatch()
    bundle_mod.check_out_dir(out_dir)
    with clock.stage("data"):
        prepared = prepare_data(Path(data_dir), opts, say)
    opts = prepared.options
    native.import_quietly("tensorflow")  # only from here on, without its start-up lines
    trained = train(prepared, opts, say, clock)
    with clock.stage("quantize"):
        quantized = quantize(prepared, trained, opts, say)
    staging = bundle_mod.staging_dir(out_dir)
    try:
        header = _manifest_header(opts, prepared, trained, quantized)
        with clock.stage("evaluate"):
            # A provisional bundle lets the edge's Classifier load the int8 model.
            classifier = _provisional_classifier(staging, header, quantized)
            evaluation = evaluate(classifier, prepared, trained, quantized.float_bytes, opts, out_dir)
        manifest = write_bundle(staging, classifier, header, prepared, trained, quantized, evaluation, opts, clock)
        del classifier  # the check loads the bundle afresh, as the edge will
        with native.quiet_native_output():
            bundle_mod.verify_bundle(staging)
        final = bundle_mod.install_bundle(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print_summary(final, header, evaluation, say)
    if not evaluation.gate["passed"]:
        raise QuantizationGateError(evaluation.gate["message"])
    return FitResult(
        bundle_dir=final,
        manifest=manifest,
        float_metrics=evaluation.float_metrics,
        int8_metrics=evaluation.int8_metrics,
        operating_point=evaluation.point,
        gate_passed=bool(evaluation.gate["passed"]),
        seconds=clock.elapsed(),
        durations=clock.seconds,
    )


GROUP_BY = ("none", "number", "content")


def _groups(data: DataReport, opts: FitOptions) -> GroupFn | None:
    """Which files must share a split and a fold (near-duplicates), by ``opts.group_by``."""
    if opts.group_by == "number":
        return number_groups(data.samples, gap=opts.group_gap)
    if opts.group_by == "content":
        return content_groups(data.samples)
    return None


def prepare_data(data_dir: Path, opts: FitOptions, say: Echo) -> PreparedData:
    """Check and split DATA_DIR, then load what the network trains on: model-size arrays of
    whole pictures, or a tiled fit's crops."""
    data = scan_dataset(data_dir, pass_label=opts.pass_label, min_per_class=opts.min_per_class, masks_dir=opts.masks)
    for line in data.summary_lines():
        say(line)
    groups = _groups(data, opts)
    split = split_dataset(data.samples, seed=opts.seed, fractions=opts.fractions, groups=groups)
    say(
        f"split ({split.method}, seed {opts.seed}): "
        + ", ".join(f"{k} {v}" for k, v in split.sizes().items())
        + (f", {len({groups(s) for s in data.samples})} groups" if groups else "")
    )
    if min(split.sizes().values()) == 0:
        raise TrainingError("a split came out empty; add images (each class needs at least 10)")
    if opts.size_from_data and opts.tile is None:
        short_side = _median_short_side(split.train)
        size = auto_size(len(split.train), short_side)
        opts = dataclasses.replace(opts, size=size, height=None, size_from_data=False)
        say(
            f"model input {size}x{size} px (auto: {len(split.train)} training pictures, median shorter side "
            f"{short_side:.0f} px; {LARGE_SIZE} px for up to about 830 pictures of at least {LARGE_SIZE} px, else "
            f"{DEFAULT_SIZE}; --size sets it)"
        )

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
        # "test" is scored picture by picture.
        raw_x = {"train": train_crops.x, "val": val_crops.x}
        fx = dict(raw_x)
        model_ys = {**model_ys, "train": train_crops.y, "val": val_crops.y}
        masks_train, mask_known = train_crops.masks, train_crops.known
    return PreparedData(
        data=data, split=split, groups=groups, prep=prep, ys=ys, model_labels=model_labels, model_ys=model_ys,
        raw_x=raw_x, fx=fx, masks_train=masks_train, mask_known=mask_known, crops=crops, options=opts,
    )


def train(prepared: PreparedData, opts: FitOptions, say: Echo, clock: Stopwatch) -> TrainedModel:
    """Train the network; then choose the operating point's held-out scores (and a tiled fit's
    decision rule) and move the float cut to the middle of the output range."""
    config = _train_config(opts, prepared)
    _say_training_plan(prepared, opts, config, say)
    with clock.stage("train"):
        result = _train_network(prepared, config, say)
    with clock.stage("operating_scores"):
        # The operating point's scores: validation, or out-of-fold when it has few defects.
        if prepared.crops is None:
            selection = _selection_scores(prepared, result.model, config, opts, say)
            rule: RuleChoice | None = None
        else:
            selection, rule = _tiled_selection_scores(prepared, prepared.crops, result.model, config, opts, say)
        shift, selection = _centre_operating_point(result.model, selection, rule, prepared.model_pass, opts, say)
    return TrainedModel(config=config, result=result, selection=selection, shift=shift, rule=rule)


def _train_config(opts: FitOptions, prepared: PreparedData) -> TrainConfig:
    from training import model as model_mod

    epochs = opts.epochs or auto_epochs(len(prepared.model_ys["train"]))  # crops, for a tiled fit
    return model_mod.TrainConfig(
        epochs=epochs,
        min_epochs=max(1, epochs // 2),
        batch_size=opts.batch_size,
        learning_rate=opts.learning_rate,
        patience=opts.patience,
        seed=opts.seed,
        filters=opts.filters,
        stem=opts.stem,
        shading=opts.shading,
        # Tiles already see each masked defect in several focus crops: "auto" adds none there
        # (docs/training.md, "Defect transplant").
        transplant=0.0 if opts.tile and opts.transplant == "auto" else opts.transplant,
        label_smoothing=opts.label_smoothing,
        map_clip=(None if opts.tile else 6.0) if opts.map_clip == "auto" else opts.map_clip,  # type: ignore[arg-type]
        augmentation=model_mod.Augmentation() if opts.augment else model_mod.Augmentation(False, False, 0.0, 0.0, 0.0),
    )


def _say_training_plan(prepared: PreparedData, opts: FitOptions, config: TrainConfig, say: Echo) -> None:
    p = prepared
    say(
        f"training: {p.prep.width}x{p.prep.height} {opts.color_mode}{' tiles' if opts.tile else ''}, "
        f"up to {config.epochs} epochs{'' if opts.epochs else ' (auto)'}, batch {opts.batch_size}, "
        f"lr {opts.learning_rate}, class-weighted loss (imbalance {p.data.imbalance:.1f}:1)"
        + (f", outputs {p.model_labels[0]} / {MERGED_DEFECT_LABEL} (defect classes merged)" if p.merged else "")
    )
    defects = p.model_ys["train"] != p.model_pass
    n_masked = int(np.sum(p.mask_known & defects))
    if n_masked:
        say(f"  defect masks for {n_masked} of {int(np.sum(defects))} training "
            f"{'defect crops' if opts.tile else 'defects'}: the defect map learns from them")
    if config.transplant != "auto" and config.transplant:
        say(f"  defect transplant: {config.transplant:g} more training defects per masked one, "
            "its defect moved onto a good training input (training/transplant.py)")


def _train_network(prepared: PreparedData, config: TrainConfig, say: Echo) -> TrainResult:
    from training import model as model_mod

    def on_epoch(log: EpochLog) -> None:
        say(
            f"  epoch {log.epoch:>3}/{config.epochs}  loss {log.loss:.4f}  acc {log.accuracy:.3f}  "
            + (f"map_loss {log.map_loss:.4f}  " if log.map_loss is not None else "")
            + f"val_loss {log.val_loss:.4f}  val_bal_acc {log.val_accuracy:.3f}  {log.seconds:5.1f}s"
            + ("  *" if log.best else "")
        )

    p, crops = prepared, prepared.crops
    if crops is None:
        result = model_mod.train_model(
            p.fx["train"], p.model_ys["train"], p.fx["val"], p.model_ys["val"], len(p.model_labels), config,
            masks_train=p.masks_train, mask_known=p.mask_known, pass_index=p.model_pass, on_epoch=on_epoch,
        )
    else:
        result = _train_on_crops(
            crops, np.arange(crops.n_train), np.arange(crops.n_train, len(crops.samples)), config,
            len(p.model_labels), on_epoch=on_epoch, say=say,
        )
    say(f"  best epoch {result.best_epoch} of {result.epochs_run} (weights restored), {result.seconds:.0f}s"
        + (f", {result.transplants} more defects transplanted onto good training inputs" if result.transplants else ""))
    return result


def _centre_operating_point(
    model: Any, selection: OperatingScores, rule: RuleChoice | None, model_pass: int, opts: FitOptions, say: Echo
) -> tuple[float, OperatingScores]:
    """Move the float model's chosen cut to the middle of the output range, where int8 resolves
    it best; returns the defect logit's shift and the selection scores moved with it."""
    from training import model as model_mod

    float_point = selection.choose(opts.target_recall, opts.max_false_reject)
    # A fused rule adds the whole view's logit with its weight, so it moves (1 + weight) times.
    gain = 1.0 + (rule.tiling.whole_weight if rule is not None and rule.tiling.rule == "fused" else 0.0)
    cut = float(np.clip(float_point.threshold, 1e-4, 1 - 1e-4))
    shift = model_mod.move_operating_point(model, 1.0 / (1.0 + ((1 - cut) / cut) ** (1.0 / gain)), model_pass)
    if shift:
        say(f"  operating point moved to the middle of the output range (defect logit {shift:+.2f})")
    return shift, selection.shifted(shift * gain)


def quantize(prepared: PreparedData, trained: TrainedModel, opts: FitOptions, say: Echo) -> QuantizedModel:
    """Full-integer int8 conversion calibrated on training inputs, and the float32 twin."""
    from training import export as export_mod
    from training import model as model_mod

    representative = model_mod.as_float(export_mod.representative_subset(prepared.fx["train"], seed=opts.seed))
    int8_bytes = export_mod.convert_int8(trained.model, representative)
    float_bytes = export_mod.convert_float(trained.model)
    in_spec, out_spec = export_mod.tensor_specs(int8_bytes)
    say(
        f"quantized: int8 {len(int8_bytes) / 1024:.1f} KiB (float32 {len(float_bytes) / 1024:.1f} KiB), "
        f"calibrated on {len(representative)} training images; input scale {in_spec.scale:.6g} zero point {in_spec.zero_point}"
    )
    return QuantizedModel(int8_bytes, float_bytes, in_spec, out_spec, representative_images=len(representative))


def _manifest_header(
    opts: FitOptions, prepared: PreparedData, trained: TrainedModel, quantized: QuantizedModel
) -> bundle_mod.ManifestHeader:
    tiling = trained.tiling
    return bundle_mod.ManifestHeader(
        name=opts.name or _default_name(prepared.data.data_dir),
        version=opts.version or bundle_mod.default_version(),
        created=bundle_mod.utc_now(),
        labels=prepared.model_labels,
        pass_label=prepared.data.pass_label,
        input_spec=quantized.input_spec.to_manifest(),
        output_spec=quantized.output_spec.to_manifest(),
        preprocessing=prepared.prep.model_dump(),
        tiling=tiling.model_dump() if tiling is not None else None,
    )


def _provisional_classifier(staging: Path, header: bundle_mod.ManifestHeader, quantized: QuantizedModel) -> Classifier:
    """Both models and a manifest without metrics in ``staging``, loaded as the edge loads a bundle."""
    (staging / MODEL_FILE).write_bytes(quantized.int8_bytes)
    (staging / REPORT_DIR / bundle_mod.FLOAT_MODEL_FILE).write_bytes(quantized.float_bytes)
    bundle_mod.write_manifest(staging, header.manifest(staging, threshold=0.5, metrics={}, dataset={}, training={}, reference={}))
    with native.quiet_native_output():  # the runtime announces its delegate on stderr
        return Classifier(staging)


def evaluate(
    classifier: Classifier,
    prepared: PreparedData,
    trained: TrainedModel,
    float_bytes: bytes,
    opts: FitOptions,
    out_dir: Path,
) -> Evaluation:
    """Choose the shipped point on the int8 model's held-out scores, score the test split with
    both models, time them and run the quantization gate."""
    p, labels = prepared, prepared.data.labels
    pass_label = p.data.pass_label
    true = {name: [labels[i] for i in p.ys[name]] for name in ("val", "test")}
    int8_val, int8_test = _int8_held_out_scores(classifier, prepared, trained.tiling)
    # The shipped point: on the int8 model's own validation scores, or on the fold models'
    # out-of-fold scores (float, moved into the shipped model's scale).
    selection = trained.selection
    shipped_scores = (
        dataclasses.replace(selection, scores=int8_val, model="int8") if selection.scores_from == "validation" else selection
    )
    point = shipped_scores.choose(opts.target_recall, opts.max_false_reject)
    int8_metrics = compute_metrics(true["test"], int8_test, pass_label, point.threshold)
    # float (the Keras model), judged the same way at its own point.
    float_test = _float_test_scores(prepared, trained)
    float_point = selection.choose(opts.target_recall, opts.max_false_reject)
    float_metrics = compute_metrics(true["test"], float_test, pass_label, float_point.threshold)
    latency = _latency_of_both(classifier.bundle_dir, prepared, trained.tiling, float_bytes, opts.latency_samples)

    # The gate compares the two models at the threshold the bundle ships: what quantization
    # does to the line's decisions. Each at its own validation threshold (the float/int8
    # columns of the report) the difference is mostly the noise of where each cut lands
    # (docs/training.md, "Evaluation and the quantization gate").
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
    return Evaluation(
        point=point,
        shipped_scores=shipped_scores,
        float_point=float_point,
        int8_metrics=int8_metrics,
        float_metrics=float_metrics,
        test_labels=true["test"],
        test_is_defect=p.ys["test"] != p.pass_index,
        int8_test=int8_test,
        float_test=float_test,
        val_labels=true["val"],
        int8_val=int8_val,
        latency=latency,
        latency_budget_ms=round(max(20.0, 10.0 * latency["int8"]["p99_ms"]), 3),
        gate=gate,
        runtime=classifier.runtime,
    )


def _int8_held_out_scores(clf: Classifier, prepared: PreparedData, tiling: Tiling | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 defect scores of validation and test, through the edge classifier."""
    if tiling is None:
        int8_val, _, _ = _int8_scores(clf, prepared.raw_x["val"])
        int8_test, _, _ = _int8_scores(clf, prepared.raw_x["test"])
        return int8_val, int8_test
    frame = _int8_scorer(clf)
    color_mode = prepared.prep.color_mode
    return (
        picture_scores(prepared.split.val, tiling, color_mode, frame, batch=1),
        picture_scores(prepared.split.test, tiling, color_mode, frame, batch=1),
    )


def _float_test_scores(prepared: PreparedData, trained: TrainedModel) -> np.ndarray:
    """The Keras model's defect scores of the test split."""
    from training import model as model_mod

    tiling = trained.tiling
    if tiling is None:
        return _scores(model_mod.predict_proba(trained.model, prepared.fx["test"]), prepared.model_pass)
    scorer = _float_scorer(trained.model, prepared.model_pass)
    return picture_scores(prepared.split.test, tiling, prepared.prep.color_mode, scorer)


def _latency_of_both(
    bundle_dir: Path, prepared: PreparedData, tiling: Tiling | None, float_bytes: bytes, samples: int
) -> dict[str, Any]:
    """int8 through the classifier and the float twin, same runtime, one thread each."""
    from training import export as export_mod

    with native.quiet_native_output():
        clf = Classifier(bundle_dir, num_threads=1)
    float_runner = export_mod.FloatTFLite(float_bytes, num_threads=1, runtime=clf.runtime)
    if tiling is None:
        batches_u8 = [clf.quantize(img) for img in prepared.raw_x["test"][:50]]
        int8_latency = _latency(clf.invoke, batches_u8, samples)
        float_latency = _latency(float_runner.invoke, [x[None, ...] for x in prepared.fx["test"][:50]], samples)
    else:
        # per frame: all of a frame's model inputs (the float twin takes them one by one)
        frames = [inputs for _, inputs in picture_inputs(prepared.split.test[:5], tiling, prepared.prep.color_mode)]
        int8_latency = _latency(clf.invoke_batch, [clf.quantize_inputs(f) for f in frames], min(samples, 40))
        float_latency = _latency(_one_by_one(float_runner.invoke), frames, min(samples, 5))
    return {"runtime": clf.runtime, "num_threads": 1, "int8": int8_latency, "float32": float_latency}


def write_bundle(
    staging: Path,
    classifier: Classifier,
    header: bundle_mod.ManifestHeader,
    prepared: PreparedData,
    trained: TrainedModel,
    quantized: QuantizedModel,
    evaluation: Evaluation,
    opts: FitOptions,
    clock: Stopwatch,
) -> dict[str, Any]:
    """Golden images, reference statistics, the manifest and the report in ``staging``;
    returns the manifest."""
    p, e = prepared, evaluation
    golden = _write_golden(staging, classifier, prepared, trained.tiling, e.test_labels, opts.golden_per_class)
    reference = bundle_mod.reference_statistics(p.raw_x["train"], e.int8_val, e.val_labels, p.data.labels)
    clock.seconds["total"] = clock.elapsed()
    epochs_chosen = "given" if opts.epochs else f"auto: ceil({AUTO_EPOCH_IMAGES} / training images) in {list(AUTO_EPOCHS_RANGE)}"
    training = bundle_mod.training_info(
        trained.config,
        trained.result,
        epochs_chosen=epochs_chosen,
        operating_point_shift=trained.shift,
        merged_outputs=p.merged,
        tiles=bundle_mod.tiles_info(p.crops, trained.rule) if p.crops is not None else None,
        representative_images=quantized.representative_images,
        durations=clock.seconds,
    )
    manifest = header.manifest(
        staging,
        threshold=e.point.threshold,
        operating_point=e.point.to_manifest(),
        metrics=bundle_mod.metrics_info(e),
        dataset=bundle_mod.dataset_info(p.data, p.split, group_by=opts.group_by, group_gap=opts.group_gap),
        training=training,
        reference=reference,
        golden=golden,
        latency_budget_ms=e.latency_budget_ms,
    )
    bundle_mod.write_manifest(staging, manifest)
    report.write_report(staging / REPORT_DIR, manifest, e, p.data, p.split)
    return manifest


def _write_golden(
    staging: Path, clf: Classifier, prepared: PreparedData, tiling: Tiling | None, test_labels: list[str], per_class: int
) -> list[dict[str, Any]]:
    """Golden images from the test split, and their expected outputs through the classifier on the PNG files."""
    if tiling is None:
        picked = bundle_mod.select_golden(test_labels, per_class)
        images = [prepared.raw_x["test"][i] for i in picked]
    else:  # whole frames (one per class: camera frames make large PNGs)
        picked = bundle_mod.select_golden(test_labels, min(1, per_class))
        color_mode = prepared.prep.color_mode
        images = [_as_hwc(to_color_mode(read_image(prepared.split.test[i].path), color_mode)) for i in picked]
    entries = bundle_mod.write_golden(staging, images, [test_labels[i] for i in picked], prepared.prep.color_mode)
    return bundle_mod.golden_expectations(clf, entries)


def print_summary(bundle_dir: Path, header: bundle_mod.ManifestHeader, evaluation: Evaluation, say: Echo) -> None:
    """The lines a person reads at the end of a fit: test metrics, operating point, latency, gate."""
    e = evaluation
    say("evaluation on the test split (each model at its validation threshold):")
    for line in report.metrics_table(e.float_metrics, e.int8_metrics):
        say("  " + line)
    for line in report.operating_point_lines(e.point):
        say(line)
    latency, int8, float32 = e.latency, e.latency["int8"], e.latency["float32"]
    say(
        f"latency ({latency['runtime']}, 1 thread): int8 p50 {int8['p50_ms']:.3f} ms, p99 {int8['p99_ms']:.3f} ms; "
        f"float32 p50 {float32['p50_ms']:.3f} ms; budget {e.latency_budget_ms} ms"
    )
    say(f"quantization gate: {e.gate['message']}")
    say(f"bundle: {bundle_dir} ({header.name} {header.version}); report: {bundle_dir / REPORT_DIR}")


def _selection_scores(
    prepared: PreparedData, model: Any, config: TrainConfig, opts: FitOptions, say: Echo
) -> OperatingScores:
    """Float scores of images the scoring model did not train on, to choose the operating point.

    The final model's validation scores when validation holds MIN_VALIDATION_DEFECTS defects
    or more (or ``opts.folds`` is 0); else out-of-fold scores over train and validation
    (:mod:`training.folds`), from fold models trained with the final model's recipe.
    """
    from training import model as model_mod

    p, data, split = prepared, prepared.data, prepared.split
    model_pass = p.model_pass
    n_val_defects = int(np.sum(p.model_ys["val"] != model_pass))
    if opts.folds == 0 or n_val_defects >= MIN_VALIDATION_DEFECTS:
        probs = model_mod.predict_proba(model, p.fx["val"])
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
    x = np.concatenate([p.fx["train"], p.fx["val"]])
    y = np.concatenate([p.model_ys["train"], p.model_ys["val"]])
    masks_val, known_val = load_masks(split.val, data.masks, p.fx["val"], data.pass_label)
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
        len(p.model_labels),
        folds=opts.folds,
        pass_index=model_pass,
        masks=np.concatenate([p.masks_train, masks_val]),
        mask_known=np.concatenate([p.mask_known, known_val]),
        groups=[p.groups(s) for s in pool] if p.groups else None,
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


def _tiled_selection_scores(
    prepared: PreparedData, crops: PoolCrops, model: Any, config: TrainConfig, opts: FitOptions, say: Echo
) -> tuple[OperatingScores, RuleChoice]:
    """:func:`_selection_scores` for a tiled model, and the decision rule chosen on the same
    held-out pictures (training/tiles.py ``choose_rule``): each picture's score is the rule
    over its model inputs, cut as the box cuts them."""
    from training.folds import out_of_fold

    pass_class = crops.pass_class
    val_pictures = np.arange(crops.n_train, len(crops.samples))
    n_val_defects = int(np.sum(crops.classes[val_pictures] != pass_class))
    if opts.folds == 0 or n_val_defects >= MIN_VALIDATION_DEFECTS:
        held_samples: Sequence[Sample] = crops.samples[crops.n_train :]
        is_defect = crops.classes[val_pictures] != pass_class
        parts = picture_parts(held_samples, crops.tiling, crops.color_mode, _float_scorer(model, pass_class))
        scores_from = "validation"
    else:
        held_samples = crops.samples
        is_defect = crops.classes != pass_class
        say(
            f"operating point: validation has {n_val_defects} defects (< {MIN_VALIDATION_DEFECTS}), so {opts.folds} fold "
            f"models score all {int(np.sum(is_defect))} training and validation defect pictures out of fold"
        )

        def train_and_score(
            fit_idx: np.ndarray, val_idx: np.ndarray, hold_idx: np.ndarray, fold_config: TrainConfig
        ) -> tuple[np.ndarray, TrainResult]:
            fold = _train_on_crops(crops, fit_idx, val_idx, fold_config, len(prepared.model_labels))
            held = [crops.samples[i] for i in hold_idx]
            return picture_parts(held, crops.tiling, crops.color_mode, _float_scorer(fold.model, pass_class)), fold

        groups = prepared.groups
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
        pass_label=prepared.data.pass_label,
        files=tuple(str(s.path) for s in held_samples),
        labels=tuple(s.label for s in held_samples),
        scores=rule_scores(parts, rule.tiling),
    )
    return selection, rule


def _train_on_crops(
    crops: PoolCrops,
    fit_pictures: np.ndarray,
    val_pictures: np.ndarray,
    config: TrainConfig,
    num_classes: int,
    *,
    on_epoch: Callable[[EpochLog], None] | None = None,
    say: Echo = lambda line: None,
) -> TrainResult:
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


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else image[:, :, None]


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


__all__ = [
    "AUTO_EPOCH_IMAGES",
    "DEFAULT_FILTERS",
    "DEFAULT_SIZE",
    "LARGE_SIZE",
    "FitOptions",
    "FitResult",
    "PreparedData",
    "QuantizedModel",
    "TrainedModel",
    "auto_epochs",
    "auto_size",
    "evaluate",
    "fit",
    "prepare_data",
    "print_summary",
    "quantization_gate",
    "quantize",
    "train",
    "write_bundle",
]
