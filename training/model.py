"""The small CNN, its augmentation and a reproducible training loop (Keras 3).

The network is sized for edge CPUs and for full-integer quantization: Conv-BN-ReLU6
blocks with max pooling, depthwise-separable blocks, BatchNorm that the TFLite converter
folds into the convolutions, ReLU6 only (its fixed [0, 6] range quantizes well), and a
defect map (one logit per 8x8-pixel cell) whose clipped max decides the part; see
:func:`build_networks`. Defect masks, where a dataset has some, train the map directly
beside the image labels.

Augmentation (flips and transposes, brightness/contrast jitter, sensor noise) happens in
the training step on each batch, from stateless random ops seeded per batch
(:func:`augment_batch`); it is not part of the exported model, so the edge runs exactly
the network that was evaluated.

:func:`train_model` is reproducible: same arrays and config, same weights. It sets the
seeds, TF ops are deterministic, shuffling comes from a ``numpy`` generator seeded per
epoch and augmentation from stateless random ops seeded per batch.

Imports TensorFlow: import this module only inside commands that train.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402 - TF_CPP_MIN_LOG_LEVEL must be set first
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

logger = logging.getLogger(__name__)

# Small datasets give few steps per epoch: Keras' default 0.99 leaves the moving statistics
# (what inference and the int8 export use) far behind the weights for many epochs.
_BN_MOMENTUM = 0.9
LOCAL_CONTRAST_GAIN = 10.0
# The defect map has one cell per MAP_CELL x MAP_CELL input pixels (three 2x2 poolings).
MAP_CELL = 8
# A cell is a defect cell when some pixel in it is at least this much defect (mask coverage
# after resizing to the model's input): a thin scratch at 0.8 px still counts.
MAP_CELL_COVERAGE = 0.25


@dataclass(frozen=True)
class Augmentation:
    """Label-preserving changes applied to training images only."""

    flips: bool = True
    rot90: bool = True  # only applied to square inputs
    brightness: float = 0.05  # +- added to [0, 1] pixels
    contrast: float = 0.1  # +- relative, around each image's mean
    noise: float = 0.01  # max std of added gaussian noise, in [0, 1] units (faint defects are ~2.5 sigma)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights, besides the data."""

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 3e-3
    patience: int = 8  # epochs without a better val loss before stopping
    # No early stop before this epoch: on hard data the loss sits on a plateau for a while
    # before the network finds the defects, and patience alone would stop it there.
    min_epochs: int = 20
    seed: int = 0
    filters: int = 8  # of the first conv; later blocks use 2x, 4x, 8x, 16x (train fit's default: 16)
    dropout: float = 0.2
    # build_networks' head. "auto": "map" when masks show defects in the training split,
    # "features" otherwise: without masks the map head (a max over cells, trained by image
    # labels alone) learns slower than the features head (docs/training.md, "Model").
    head: str = "auto"
    mask_weight: float = 1.0  # defect-map loss against the class loss, where masks exist
    # Defect cells are few (a scratch covers ~5 % of the cells of its image): weigh them up.
    mask_pos_weight: float = 5.0
    # int8-friendly bounds and the map head's cell context: see build_networks.
    relu_max: float | None = 6.0
    map_clip: float | None = 6.0
    context: bool = True
    int8_level: bool = True  # the level in whole grey levels, as int8 computes it (RoundLikeInt8)
    # "pool": the first conv at full resolution, then 2x2 max pooling; "strided": the first
    # conv steps by 2 (a 3x3 window still covers every pixel) at a quarter of the cost.
    stem: str = "pool"
    # The map head's shading branch (build_networks): a coarse view of the raw input beside
    # the defect map, for defects that are a whole region's level rather than a local mark.
    shading: bool = False
    # Class targets 1 - e/2 and e/2 instead of 1 and 0: the softmax stops short of 0 and 1,
    # so int8's 256 output steps keep the order of confident parts instead of rounding
    # them all to the end steps (docs/training.md, "Operating point").
    label_smoothing: float = 0.1
    # Defect transplant (training/transplant.py): new defect inputs per masked defect input,
    # each its defect moved onto a good training input; 0 = none, "auto": top up a few dozen.
    transplant: float | str = 0.0
    augmentation: Augmentation = field(default_factory=Augmentation)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augmentation"] = self.augmentation.to_dict()
        return d


@dataclass(frozen=True)
class EpochLog:
    """One epoch's figures, as the progress line shows them."""

    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float
    best: bool
    map_loss: float | None = None  # defect-map loss on the masks, when there are masks


@dataclass(frozen=True)
class TrainResult:
    """The trained model (best validation loss weights restored) and how it got there."""

    model: keras.Model
    history: tuple[EpochLog, ...]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float
    used_masks: bool = False
    masked_images: int = 0  # training images whose mask shows a defect
    head: str = "features"  # the head build_networks was given (see there)
    trainer: keras.Model | None = None  # the same layers with the defect map output
    transplants: int = 0  # defect inputs made by transplant (config.transplant)


def set_seed(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic (same data + seed -> same model)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


@keras.saving.register_keras_serializable(package="linewatch")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """Keras' BatchNormalization, trained through TensorFlow's fused kernel.

    Keras 3 computes training-time moments with separate reductions, which on a CPU makes
    the full-resolution block's BatchNorm cost more than its convolution (docs/training.md,
    "Model"); FusedBatchNormV3 does the same arithmetic in one pass. Inference (and so the export, where the converter
    folds BatchNorm into the convolution) is Keras' own code, untouched; the weights and the
    moving-statistics update are Keras' as well.
    """

    def call(self, inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if not training or self.axis not in (-1, len(inputs.shape) - 1) or len(inputs.shape) != 4:
            return super().call(inputs, training=training, mask=mask)
        zeros = tf.zeros_like(self.moving_mean)
        y, mean, var, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=self.gamma if self.scale else tf.ones_like(zeros),
            offset=self.beta if self.center else zeros,
            mean=zeros,
            variance=zeros,
            epsilon=self.epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        # The fused kernel returns the unbiased variance; Keras keeps the biased one.
        n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), var.dtype)
        var = var * (n - 1.0) / n
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + var * (1.0 - self.momentum))
        return y


def _conv_bn_relu(x: Any, filters: int, strides: int, name: str, relu_max: float | None = None) -> Any:
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = FusedBatchNorm(momentum=_BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(max_value=relu_max, name=f"{name}_relu")(x)


def _separable_block(x: Any, filters: int, strides: int, name: str, relu_max: float | None = None) -> Any:
    x = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = FusedBatchNorm(momentum=_BN_MOMENTUM, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(max_value=relu_max, name=f"{name}_dw_relu")(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    x = FusedBatchNorm(momentum=_BN_MOMENTUM, name=f"{name}_pw_bn")(x)
    return keras.layers.ReLU(max_value=relu_max, name=f"{name}_pw_relu")(x)


@keras.saving.register_keras_serializable(package="linewatch")
class RoundLikeInt8(keras.layers.Layer):
    """Rounds to a multiple of ``step`` (whole grey levels), as int8 does on the box.

    For the local-contrast level: int8 AveragePooling and ResizeBilinear keep the input's
    scale, so on the box the level is rounded to whole grey levels, twice. In a lighting
    gradient that rounding draws 1-grey-level steps along the iso-lines and a 4-pixel
    grid: faint lines everywhere, which a network trained on the exact level never saw.
    With this layer the float network computes the level the int8 one does, in training
    and at inference; the int8 export leaves it out (:func:`int8_native_rounding`), where
    the kernels round themselves. The level path has no weights, so the straight-through
    gradient is never used.

    ``ties``: "away" rounds halves away from the int8 zero point (grey level 128 for the
    divide_255 input, zero point -128), as LiteRT's int8 AveragePooling does; "up" rounds
    them up, as its int8 ResizeBilinear does; "even" is ``tf.round``. How much of the int8
    error each rounding accounted for: docs/training.md, "Model".
    """

    TIES = ("even", "away", "up")

    def __init__(self, step: float = 1.0 / 255.0, ties: str = "even", zero: float = 128.0 / 255.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if ties not in self.TIES:
            raise ValueError(f"ties must be one of {self.TIES}, got {ties!r}")
        self.step = float(step)
        self.ties = ties
        self.zero = float(zero)
        self.bypass = False  # read when a graph is traced: see int8_native_rounding

    def call(self, x: Any) -> Any:
        if self.bypass:
            return x
        v = (x - self.zero) / self.step
        if self.ties == "even":
            r = tf.round(v)
        else:
            # The kernels see exact fractions (sums of 16 levels / 16, bilinear weights in
            # eighths); float32 brings them back within 1e-5, so snap before breaking ties.
            v = tf.round(v * 1024.0) / 1024.0
            r = tf.sign(v) * tf.floor(tf.abs(v) + 0.5) if self.ties == "away" else tf.floor(v + 0.5)
        return x + tf.stop_gradient(r * self.step + self.zero - x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "step": self.step, "ties": self.ties, "zero": self.zero}


@contextlib.contextmanager
def int8_native_rounding(model: Any) -> Iterator[None]:
    """Leaves the RoundLikeInt8 layers out of graphs traced inside (the int8 export:
    int8 has no ROUND kernel, and its pooling and resize kernels round to the same grey
    levels by themselves)."""
    layers = [layer for layer in getattr(model, "layers", []) if isinstance(layer, RoundLikeInt8)]
    for layer in layers:
        layer.bypass = True
    try:
        yield
    finally:
        for layer in layers:
            layer.bypass = False


def _local_level(x: Any, height: int, width: int, int8_level: bool = True) -> Any:
    """Each pixel's neighbourhood level: a 4x4 average pool resized back (bilinear)."""
    level = keras.layers.AveragePooling2D(4, 4, padding="same", name="level_pool")(x)
    if int8_level:
        level = RoundLikeInt8(ties="away", name="level_pool_int8")(level)
    level = keras.layers.Resizing(height, width, interpolation="bilinear", name="level")(level)
    if int8_level:
        level = RoundLikeInt8(ties="up", name="level_int8")(level)
    return level


def _local_contrast(x: Any, height: int, width: int, int8_level: bool = True) -> Any:
    """Each pixel minus its neighbourhood's level (x LOCAL_CONTRAST_GAIN), for the map head.

    The level is a 4x4 average pool resized back to full size (bilinear). Lighting
    gradients, glare and exposure move whole regions by far more than a faint scratch
    differs from its surroundings; taking the level away leaves the thin structures and
    lets the first convolution spend its few filters on them. A pooled and resized level
    rather than a stride-1 average, which LiteRT has no fast int8 kernel for (the variants
    and their costs: docs/training.md, "Model").
    """
    level = _local_level(x, height, width, int8_level)
    x = keras.layers.Subtract(name="local_contrast")([x, level])
    return keras.layers.Rescaling(LOCAL_CONTRAST_GAIN, name="local_contrast_gain")(x)


def _shading_logit(inputs: Any, filters: int, relu_max: float | None) -> Any:
    """One logit from the input's 8x8-cell means: the level across the picture."""
    x = keras.layers.AveragePooling2D(MAP_CELL, name="shade_mean")(inputs)
    x = _conv_bn_relu(x, filters * 2, 1, "shade1", relu_max=relu_max)
    x = keras.layers.MaxPooling2D(name="shade_pool")(x)
    x = _conv_bn_relu(x, filters * 2, 1, "shade2", relu_max=relu_max)
    pooled = keras.layers.Concatenate(name="shade_pooled")(
        [keras.layers.GlobalAveragePooling2D(name="shade_gap")(x), keras.layers.GlobalMaxPooling2D(name="shade_gmp")(x)]
    )
    return keras.layers.Dense(1, name="shade_logit")(pooled)


def _checked_head(num_classes: int, head: str, stem: str) -> str:
    """The head :func:`build_networks` builds: ``head``, or "features" for more than two
    classes; :class:`ValueError` for an unknown head or stem or fewer than two classes."""
    if stem not in ("pool", "strided"):
        raise ValueError(f"stem must be 'pool' or 'strided', got {stem!r}")
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    if head not in ("map", "features"):
        raise ValueError(f"head must be 'map' or 'features', got {head!r}")
    return "features" if num_classes > 2 else head


def _backbone(x: Any, filters: int, stem: str, relu_max: float | None) -> Any:
    """Three Conv-BN-ReLU blocks at full, 1/2 and 1/4 resolution, each followed by 2x2 max
    pooling (a thin scratch survives a max, a strided convolution can step over it), then
    a depthwise-separable block at 1/8.

    ``stem="strided"``: the first block is one stride-2 convolution instead of a
    full-resolution convolution and a max pool. Its 3x3 windows overlap, so a one-pixel
    line still lands in one, and the first layer, the costliest with the pool stem, runs
    at a quarter of the positions."""
    for i, mult in enumerate((1, 2, 4)):
        if i == 0 and stem == "strided":
            x = _conv_bn_relu(x, filters, 2, "conv1", relu_max=relu_max)
            continue
        x = _conv_bn_relu(x, filters * mult, 1, f"conv{i + 1}", relu_max=relu_max)
        x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    return _separable_block(x, filters * 8, 1, "sep4", relu_max=relu_max)


def _with_context(inputs: Any, x: Any, filters: int, relu_max: float | None) -> Any:
    """The map head's features at 1/8 joined by each 8x8 cell's brightest, darkest and mean
    input pixel (through a 1x1 Conv-BN-ReLU6), then a second separable block.

    A thin line where the level jumps is a part's edge or chamfer, one inside a flat face
    is not, and the local-contrast input alone cannot tell them apart (edges and hole
    rings were the good parts scored worst)."""
    c = MAP_CELL
    hi = keras.layers.MaxPooling2D(c, name="ctx_max")(inputs)
    neg = keras.layers.Rescaling(-1.0, name="ctx_neg")(inputs)
    lo = keras.layers.Rescaling(-1.0, name="ctx_min")(keras.layers.MaxPooling2D(c, name="ctx_negmax")(neg))
    mean = keras.layers.AveragePooling2D(c, name="ctx_mean")(inputs)
    # Mixed into the features' own range first: concatenated as [0, 1] pixels beside
    # [0, 6] activations they would share one int8 scale (6 grey levels a step).
    ctx = keras.layers.Concatenate(name="ctx_pixels")([hi, lo, mean])
    ctx = keras.layers.Conv2D(filters, 1, use_bias=False, name="ctx_conv")(ctx)
    ctx = FusedBatchNorm(momentum=_BN_MOMENTUM, name="ctx_bn")(ctx)
    ctx = keras.layers.ReLU(max_value=relu_max, name="ctx_relu")(ctx)
    x = keras.layers.Concatenate(name="ctx")([x, ctx])
    return _separable_block(x, filters * 8, 1, "ctx5", relu_max=relu_max)


def _map_head_features(inputs: Any, defect_map: Any, filters: int, relu_max: float | None,
                       map_clip: float | None, shading: bool) -> list[Any]:
    """What the map head's softmax reads: the defect map's max, and with ``shading`` the
    shading logit (:func:`_shading_logit`).

    ``map_clip``: the max of the map clipped to [-clip, clip] (a decision needs no finer
    view of sure cells), so the map's int8 step is 2 x clip / 255 of a logit."""
    # The max alone: the map's mean would be its quantized range's lower clip for the
    # many strongly clean cells, and it moved int8 scores off float (docs/training.md).
    decided = defect_map
    if map_clip is not None:
        # clip(map, -c, c) as ReLU(map + c, max 2c) - c: int8 has fused kernels for it
        decided = keras.layers.Rescaling(1.0, offset=map_clip, name="map_clip_up")(decided)
        decided = keras.layers.ReLU(max_value=2 * map_clip, name="map_clip")(decided)
        decided = keras.layers.Rescaling(1.0, offset=-map_clip, name="map_clip_down")(decided)
    features = [keras.layers.GlobalMaxPooling2D(name="map_max")(decided)]
    if shading:
        features.append(_shading_logit(inputs, filters, relu_max))
    return features


def _features_head_features(x: Any, filters: int, relu_max: float | None) -> list[Any]:
    """What the features head's softmax reads: a second separable block at 1/16, global
    average and max pooled."""
    x = keras.layers.MaxPooling2D(name="pool4")(x)
    x = _separable_block(x, filters * 16, 1, "sep5", relu_max=relu_max)
    return [keras.layers.GlobalAveragePooling2D(name="gap")(x), keras.layers.GlobalMaxPooling2D(name="gmp")(x)]


def _start_at_map_max(dense: Any, pass_index: int, n_features: int) -> None:
    """Start the map head with P(defect) = sigmoid(map max): the map's training turns into
    image decisions from the first step. A random start can have the wrong sign, and then
    the class loss pushes the map's max down on defect images, against the masks."""
    start = [[-0.5, 0.5]] if pass_index == 0 else [[0.5, -0.5]]
    start += [[0.0, 0.0]] * (n_features - 1)  # the shading logit starts silent
    dense.set_weights([np.array(start, np.float32), np.zeros(2, np.float32)])


def build_networks(
    num_classes: int,
    *,
    height: int = 128,
    width: int = 128,
    channels: int = 1,
    filters: int = 8,
    dropout: float = 0.2,
    head: str = "map",
    pass_index: int = 0,
    relu_max: float | None = 6.0,
    map_clip: float | None = 6.0,
    context: bool = True,
    int8_level: bool = True,
    stem: str = "pool",
    shading: bool = False,
) -> tuple[keras.Model, keras.Model]:
    """The inspection CNN, as (classifier, trainer).

    classifier: float image in [0, 1] (N, H, W, C) -> softmax over ``num_classes``; this
    is what is exported and what the edge runs. trainer: the same layers with a second
    output, the defect map: one logit per 8x8-pixel cell, "is there a defect here". Masks,
    where a dataset has them, supervise the map directly (thousands of labelled cells per
    image instead of one label), and the image's decision is read off the map.

    Layers: the backbone (:func:`_backbone`, ``stem`` "pool" or "strided") down to 1/8
    and the 1x1 convolution that makes the defect map. ``head="map"`` (two classes,
    trained with masks): the input first loses its local level (:func:`_local_contrast`)
    and the softmax reads the map's max (a defect anywhere fails the part). ``head="features"``
    (no masks, or more than two classes): :func:`_features_head_features` and a dense
    softmax, which can tell defect kinds apart and sees overall shading (the magnetic
    tiles' "uneven" defects); the map is then an auxiliary output, trained only on masks.
    Parameters and multiply-adds per ``filters``: docs/training.md, "Model".

    int8 and context (what each bought: docs/training.md, "Model"): ``relu_max``: every
    ReLU is a ReLU6, so every int8 activation range is [0, 6]; plain ReLU ranges are
    calibrated on outliers, which leaves typical activations few int8 steps. ``map_clip``
    (:func:`_map_head_features`): the map head decides on the map clipped to [-clip, clip].
    ``context`` (map head, :func:`_with_context`): each 8x8 cell's raw pixel range joins
    the features at 1/8. ``int8_level``: the level in whole grey levels, as the int8
    kernels compute it (:class:`RoundLikeInt8`). ``shading`` (map head,
    :func:`_shading_logit`): shading across a region (the magnetic tiles' "uneven") has
    no local mark for the map to find, so a logit of the input's 8x8-cell means joins
    the map's max before the softmax. It starts silent.
    """
    head = _checked_head(num_classes, head, stem)
    inputs = keras.Input((height, width, channels), name="image")
    x = _local_contrast(inputs, height, width, int8_level) if head == "map" else inputs
    x = _backbone(x, filters, stem, relu_max)
    if context and head == "map":
        x = _with_context(inputs, x, filters, relu_max)
    defect_map = keras.layers.Conv2D(1, 1, name="defect_map")(x)
    if head == "map":
        features = _map_head_features(inputs, defect_map, filters, relu_max, map_clip, shading)
    else:
        features = _features_head_features(x, filters, relu_max)
    pooled = features[0] if len(features) == 1 else keras.layers.Concatenate(name="pool")(features)
    if dropout > 0 and head == "features":
        pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    dense = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")
    outputs = dense(pooled)
    if head == "map":
        _start_at_map_max(dense, pass_index, len(features))
    classifier = keras.Model(inputs, outputs, name="linewatch_cnn")
    trainer = keras.Model(inputs, [outputs, defect_map], name="linewatch_cnn_with_map")
    return classifier, trainer


def augment_batch(
    images: tf.Tensor, masks: tf.Tensor | None, aug: Augmentation, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """A randomly changed copy of a batch: float images (N, H, W, C) in [0, 1] and their
    masks (N, H, W, 1), moved together by the flips and turns.

    Runs inside the training step, on the batch, where it costs a few percent of the step
    (docs/training.md, "Defect masks"). ``seed`` (shape (2,), int) makes it
    deterministic: stateless random ops, one seed per (training seed, epoch, batch).
    """
    x, m = images, masks
    n = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, 7)

    def coin(i: int) -> tf.Tensor:
        return tf.random.stateless_uniform([n, 1, 1, 1], seeds[i]) < 0.5

    def move(sel: tf.Tensor, change: Callable[[tf.Tensor], tf.Tensor]) -> None:
        nonlocal x, m
        x = tf.where(sel, change(x), x)
        if m is not None:
            m = tf.where(sel, change(m), m)

    if aug.flips:
        move(coin(0), lambda t: tf.reverse(t, [2]))
        move(coin(1), lambda t: tf.reverse(t, [1]))
    if aug.rot90 and images.shape[1] == images.shape[2]:
        # a transpose after the random flips above gives all eight turns and mirrors
        move(coin(2), lambda t: tf.transpose(t, [0, 2, 1, 3]))
    if aug.contrast > 0:
        c = tf.random.stateless_uniform([n, 1, 1, 1], seeds[3], 1 - aug.contrast, 1 + aug.contrast)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * c + mean
    if aug.brightness > 0:
        x = x + tf.random.stateless_uniform([n, 1, 1, 1], seeds[4], -aug.brightness, aug.brightness)
    if aug.noise > 0:
        sigma = tf.random.stateless_uniform([n, 1, 1, 1], seeds[5], 0.0, aug.noise)
        x = x + tf.random.stateless_normal(tf.shape(x), seeds[6]) * sigma
    return tf.clip_by_value(x, 0.0, 1.0), m


def map_cells(masks: tf.Tensor, map_height: int, map_width: int) -> tf.Tensor:
    """Masks (N, H, W, 1) of defect coverage -> defect-map targets (N, h, w, 1) in {0, 1}.

    Cell (i, j) covers input pixels [i*8, i*8+8) x [j*8, j*8+8) (the poolings floor odd
    sizes, so the last rows and columns of such an input belong to no cell); it is a defect
    cell when some pixel in it is at least MAP_CELL_COVERAGE defect.
    """
    c = MAP_CELL
    m = masks[:, : map_height * c, : map_width * c, :]
    peak = tf.nn.max_pool2d(m, c, c, "VALID")
    return tf.cast(peak >= MAP_CELL_COVERAGE, tf.float32)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * n_c): each class counts as much as the others in the loss."""
    counts = np.bincount(y, minlength=num_classes).astype(float)
    n = float(counts.sum())
    return {c: (n / (num_classes * counts[c]) if counts[c] else 0.0) for c in range(num_classes)}


def as_float(x: np.ndarray) -> np.ndarray:
    """Model inputs as float32 in [0, 1]: uint8 pixels are divided by 255 (per batch, so
    large crop sets stay uint8 in memory), float inputs pass through."""
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def predict_proba(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Float model probabilities (N, classes) for inputs in [0, 1] (or uint8, see :func:`as_float`)."""
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    out = [np.asarray(model(as_float(x[i : i + batch_size]), training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _weighted_loss(probs: np.ndarray, y: np.ndarray, weights: dict[int, float], smoothing: float = 0.0) -> float:
    """Class-weighted cross-entropy against label-smoothed targets, as the training step computes it."""
    if len(y) == 0:
        return 0.0
    k = probs.shape[1]
    targets = np.full(probs.shape, smoothing / k)
    targets[np.arange(len(y)), y] += 1.0 - smoothing
    ce = -np.sum(targets * np.log(np.clip(probs, 1e-7, 1.0)), axis=1)
    w = np.array([weights[int(c)] for c in y])
    return float(np.sum(ce * w) / max(np.sum(w), 1e-12))


def _balanced_accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    pred = probs.argmax(axis=1)
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls)) if recalls else 0.0


class EarlyStopping:
    """Early-stopping bookkeeping: keeps the weights of the epoch with the lowest validation
    loss, and says when to stop: ``patience`` epochs without a loss lower by more than
    ``min_delta``, never before epoch ``min_epochs``."""

    def __init__(self, patience: int, min_epochs: int, min_delta: float = 1e-4) -> None:
        self.patience = patience
        self.min_epochs = min_epochs
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self.stale = 0  # epochs since the best one

    def update(self, epoch: int, val_loss: float, model: keras.Model) -> bool:
        """Record an epoch's validation loss; True (and its weights kept) when it is the best so far."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.stale = val_loss, epoch, 0
            self.best_weights = [w.copy() for w in model.get_weights()]
            return True
        self.stale += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return self.stale >= self.patience and epoch >= self.min_epochs

    def restore_best(self, model: keras.Model) -> None:
        if self.best_weights is not None:
            model.set_weights(self.best_weights)


def cosine_learning_rate(config: TrainConfig, epoch: int) -> float:
    """Cosine decay per epoch (1-based), from ``config.learning_rate`` down to 5 % of it."""
    frac = (epoch - 1) / max(1, config.epochs - 1)
    return config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


StepFn = Callable[..., tuple[tf.Tensor, ...]]


def _training_step(
    trainer: keras.Model, optimizer: keras.optimizers.Optimizer, num_classes: int, config: TrainConfig, use_masks: bool
) -> StepFn:
    """One optimisation step on a batch, as a ``tf.function``: augmentation, the class-weighted
    class loss and, with masks, the defect-map loss (cells weighted by ``config.mask_pos_weight``,
    images by ``cw``, whether their mask is known). Returns the batch's class-loss and
    map-loss sums and its correct count, as tensors."""
    map_h, map_w = int(trainer.outputs[1].shape[1]), int(trainer.outputs[1].shape[2])
    mask_weight = tf.constant(config.mask_weight if use_masks else 0.0, tf.float32)
    pos_weight = float(config.mask_pos_weight)
    smoothing = float(config.label_smoothing)
    aug = config.augmentation

    @tf.function(reduce_retracing=True)
    def step(
        x: tf.Tensor, m: tf.Tensor | None, y: tf.Tensor, w: tf.Tensor, cw: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, ...]:
        x, m = augment_batch(x, m, aug, seed)
        with tf.GradientTape() as tape:
            probs, logits = trainer(x, training=True)
            ce = keras.losses.categorical_crossentropy(
                tf.one_hot(tf.cast(y, tf.int32), num_classes), probs, label_smoothing=smoothing
            )
            class_loss = tf.reduce_sum(ce * w) / tf.reduce_sum(w)
            if m is not None:
                cells = map_cells(m, map_h, map_w)
                per_image = tf.reduce_mean(
                    tf.nn.weighted_cross_entropy_with_logits(cells, logits, pos_weight), axis=[1, 2, 3]
                )
                map_loss = tf.reduce_sum(per_image * cw) / tf.maximum(tf.reduce_sum(cw), 1.0)
            else:  # zero gradients for the untrained map, rather than none (a warning)
                map_loss = 0.0 * tf.reduce_mean(logits)
            loss = class_loss + mask_weight * map_loss
        grads = tape.gradient(loss, trainer.trainable_variables)
        optimizer.apply_gradients(zip(grads, trainer.trainable_variables, strict=True))
        correct = tf.cast(tf.equal(tf.argmax(probs, axis=1), tf.cast(y, tf.int64)), tf.float32)
        size = tf.cast(tf.shape(y)[0], tf.float32)
        return class_loss * size, map_loss * size, tf.reduce_sum(correct)

    return step


@dataclass(frozen=True)
class _TrainingSet:
    """Training inputs with their targets and weights, as the training step takes them."""

    x: np.ndarray
    y: np.ndarray
    sample_w: np.ndarray  # each input's class weight
    masks: np.ndarray | None  # defect coverage (N, H, W) when the map trains on masks
    mask_w: np.ndarray  # 1 where an input's known mask trains the map, else 0

    @classmethod
    def of(
        cls, x: np.ndarray, y: np.ndarray, weights: dict[int, float], masks: np.ndarray | None, known: np.ndarray
    ) -> _TrainingSet:
        mask_w = known.astype(np.float32) if masks is not None else np.zeros(len(x), np.float32)
        return cls(x, y, np.array([weights[int(c)] for c in y], dtype=np.float32), masks, mask_w)

    def run_epoch(self, step: StepFn, epoch: int, config: TrainConfig) -> tuple[float, float, float]:
        """One pass in a shuffled order seeded by (seed, epoch); returns the class-loss sum,
        the map-loss sum and the correct count."""
        n, bs = len(self.x), config.batch_size
        order = np.random.default_rng([config.seed, epoch]).permutation(n)
        # Sums stay tensors until the epoch ends: reading one per step would make every
        # step wait for the previous one.
        sums: list[tuple[tf.Tensor, ...]] = []
        for b, i in enumerate(range(0, n, bs)):
            idx = order[i : i + bs]
            mb = self.masks[idx][..., None] if self.masks is not None else None
            seed = np.array([config.seed, epoch * 100_003 + b], np.int64)
            sums.append(step(as_float(self.x[idx]), mb, self.y[idx], self.sample_w[idx], self.mask_w[idx], seed))
        loss_sum, map_loss_sum, correct = np.sum([[float(v) for v in t] for t in sums], axis=0)
        return float(loss_sum), float(map_loss_sum), float(correct)


def _images_with_defect_mask(masks: np.ndarray | None, known: np.ndarray) -> int:
    """Training inputs whose known mask shows a defect. With none (only clean masks, of pass
    images) the map would learn "never a defect": then the image labels alone train the network."""
    return int(np.sum(known & (masks.reshape(len(known), -1).max(axis=1) > 0))) if masks is not None else 0


def _networks_for(
    x: np.ndarray, num_classes: int, config: TrainConfig, head: str, pass_index: int, initial: TrainResult | None
) -> tuple[keras.Model, keras.Model]:
    """:func:`build_networks` for inputs shaped like ``x`` (N, H, W, C), as ``config`` says,
    with ``initial``'s weights when given."""
    classifier, trainer = build_networks(
        num_classes,
        height=x.shape[1],
        width=x.shape[2],
        channels=x.shape[3],
        filters=config.filters,
        dropout=config.dropout,
        head=head,
        pass_index=pass_index,
        relu_max=config.relu_max,
        map_clip=config.map_clip,
        context=config.context,
        int8_level=config.int8_level,
        stem=config.stem,
        shading=config.shading,
    )
    if initial is not None and initial.trainer is not None:
        trainer.set_weights(initial.trainer.get_weights())
    return classifier, trainer


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    *,
    masks_train: np.ndarray | None = None,
    mask_known: np.ndarray | None = None,
    pass_index: int = 0,
    on_epoch: Callable[[EpochLog], None] | None = None,
    initial: TrainResult | None = None,
) -> TrainResult:
    """Train from inputs in [0, 1] (float, or uint8 pixels) with class weighting and early
    stopping on val loss.

    ``pass_index``: the pass class's output (the map head starts as "defect = map max").
    ``masks_train`` (N, H, W) defect coverage and ``mask_known`` (N,) bool: where a mask is
    known, the defect map is trained on it as well (weighted binary cross-entropy per
    cell, ``config.mask_weight``); a pass image is known to be clean. Without any mask that
    shows a defect the map is not trained, and head "auto" picks the features head.
    ``initial``: continue from an earlier result's weights (same inputs and head), as the
    tiled fit's second, multiple-instance round does.

    The weights of the epoch with the lowest (class-weighted) validation loss are restored
    (:class:`EarlyStopping`). Same arrays + same ``config`` give the same weights (see the
    module docstring).
    """
    set_seed(config.seed)
    t_start = time.perf_counter()
    mask_known = mask_known if mask_known is not None else np.zeros(len(x_train), bool)
    masked_images = _images_with_defect_mask(masks_train, mask_known)  # the data's own, before transplants
    use_masks = masked_images > 0
    transplants = 0
    if config.transplant != 0 and use_masks:
        x_train, y_train, masks_train, mask_known, transplants = _with_transplants(
            x_train, y_train, masks_train, mask_known, pass_index, config  # type: ignore[arg-type]
        )
    n = len(x_train)
    head = config.head if config.head != "auto" else ("map" if use_masks else "features")
    model, trainer = _networks_for(x_train, num_classes, config, head, pass_index, initial)
    weights = class_weights(y_train, num_classes)
    train_set = _TrainingSet.of(x_train, y_train, weights, masks_train if use_masks else None, mask_known)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    step = _training_step(trainer, optimizer, num_classes, config, use_masks)

    history: list[EpochLog] = []
    stopping = EarlyStopping(config.patience, config.min_epochs)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        optimizer.learning_rate.assign(cosine_learning_rate(config, epoch))
        loss_sum, map_loss_sum, correct = train_set.run_epoch(step, epoch, config)
        probs = predict_proba(model, x_val)
        val_loss = _weighted_loss(probs, y_val, weights, config.label_smoothing)
        improved = stopping.update(epoch, val_loss, model)
        log = EpochLog(
            epoch=epoch,
            loss=loss_sum / n,
            accuracy=correct / n,
            val_loss=val_loss,
            val_accuracy=_balanced_accuracy(probs, y_val),
            seconds=time.perf_counter() - t0,
            best=improved,
            map_loss=map_loss_sum / n if use_masks else None,
        )
        history.append(log)
        logger.debug("epoch %s: %s", epoch, log)
        if on_epoch is not None:
            on_epoch(log)
        if stopping.should_stop(epoch):
            break
    stopping.restore_best(model)
    return TrainResult(
        model=model,
        history=tuple(history),
        best_epoch=stopping.best_epoch,
        epochs_run=len(history),
        stopped_early=len(history) < config.epochs,
        seconds=time.perf_counter() - t_start,
        used_masks=use_masks,
        masked_images=masked_images,
        head=head if num_classes == 2 else "features",
        trainer=trainer,
        transplants=transplants,
    )


def _with_transplants(
    x: np.ndarray, y: np.ndarray, masks: np.ndarray, known: np.ndarray, pass_index: int, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The training inputs with config.transplant new defect inputs per masked defect input
    (training/transplant.py), their masks known."""
    from training.transplant import transplant

    extra = transplant(x, y, masks, known, pass_index, per_donor=config.transplant, seed=config.seed)
    if not len(extra):
        return x, y, masks, known, 0
    return (
        np.concatenate([x, extra.x]),
        np.concatenate([y, extra.y]),
        np.concatenate([masks, extra.masks]),
        np.concatenate([known, np.ones(len(extra), bool)]),
        len(extra),
    )


def move_operating_point(model: keras.Model, threshold: float, pass_index: int) -> float:
    """Shift a two-class model's defect logit so that defect score ``threshold`` becomes 0.5.

    The chosen threshold usually lands off the middle, where the int8 softmax output is
    coarsest in logit terms (a 1/256 step at 0.05 is 4x the logit change it is at 0.5)
    and where a thick cluster of good parts' scores can sit on one step. Adding
    log((1 - t) / t) to the defect output's bias maps t to 0.5; the order of the scores,
    and so every curve and threshold-based figure, is unchanged. Returns the shift
    (clipped to +-8); 0 for a model with more than two outputs, which is left alone.
    """
    if int(model.output_shape[-1]) != 2:
        return 0.0
    t = float(np.clip(threshold, 1e-4, 1 - 1e-4))
    shift = float(np.clip(math.log((1 - t) / t), -8.0, 8.0))
    dense = model.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    bias = bias.copy()
    bias[1 - pass_index] += shift
    dense.set_weights([kernel, bias])
    return shift


def model_summary(model: keras.Model) -> dict[str, Any]:
    """Parameter count and layer names, for the manifest."""
    return {"name": model.name, "parameters": int(model.count_params()), "layers": len(model.layers)}


__all__: Sequence[str] = [
    "Augmentation",
    "EarlyStopping",
    "EpochLog",
    "TrainConfig",
    "TrainResult",
    "augment_batch",
    "build_networks",
    "as_float",
    "move_operating_point",
    "class_weights",
    "cosine_learning_rate",
    "map_cells",
    "predict_proba",
    "set_seed",
    "train_model",
]
