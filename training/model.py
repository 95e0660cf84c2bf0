"""The small CNN, its augmentation and a reproducible training loop (Keras 3).

The network is sized for edge CPUs and for full-integer quantization: Conv-BN-ReLU blocks
with max pooling, depthwise-separable blocks, BatchNorm that the TFLite
converter folds into the convolutions, ReLU only (its clipped range quantizes well), then
global average *and* max pooling (a thin scratch covers a few pixels: the max keeps it
from being averaged away) and a dense softmax over the classes.

Augmentation (flips, 90-degree rotations, brightness/contrast jitter, sensor noise) happens
in numpy before each epoch, from a generator seeded with ``(seed, epoch)``; it is not part
of the exported model, so the edge runs exactly the network that was evaluated.

Imports TensorFlow: import this module only inside commands that train.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
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
    width: int = 8  # filters of the first conv; later blocks use 2x, 4x, 8x, 16x
    dropout: float = 0.2
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


@dataclass(frozen=True)
class TrainResult:
    """The trained model (best validation loss weights restored) and how it got there."""

    model: keras.Model
    history: tuple[EpochLog, ...]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    seconds: float


def set_seed(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic (same data + seed -> same model)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _conv_bn_relu(x: Any, filters: int, strides: int, name: str) -> Any:
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _separable_block(x: Any, filters: int, strides: int, name: str) -> Any:
    x = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_dw_relu")(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    x = keras.layers.BatchNormalization(momentum=_BN_MOMENTUM, name=f"{name}_pw_bn")(x)
    return keras.layers.ReLU(name=f"{name}_pw_relu")(x)


def build_model(
    num_classes: int,
    *,
    height: int = 128,
    width: int = 128,
    channels: int = 1,
    filters: int = 8,
    dropout: float = 0.2,
) -> keras.Model:
    """The inspection CNN: float input in [0, 1] (N, H, W, C) -> softmax over ``num_classes``.

    Three Conv-BN-ReLU blocks at full, 1/2 and 1/4 resolution, each followed by 2x2 max
    pooling (a thin scratch survives a max, a strided convolution can step over it), then
    two depthwise-separable blocks at 1/8 and 1/16, global average + max pooling and a dense
    softmax. With ``filters=8`` at 128x128x1: about 19 k parameters, 11 M multiply-adds.
    """
    if num_classes < 2:
        raise ValueError("a classifier needs at least two classes")
    inputs = keras.Input((height, width, channels), name="image")
    x = inputs
    for i, mult in enumerate((1, 2, 4)):
        x = _conv_bn_relu(x, filters * mult, 1, f"conv{i + 1}")
        x = keras.layers.MaxPooling2D(name=f"pool{i + 1}")(x)
    x = _separable_block(x, filters * 8, 1, "sep4")
    x = keras.layers.MaxPooling2D(name="pool4")(x)
    x = _separable_block(x, filters * 16, 1, "sep5")
    pooled = keras.layers.Concatenate(name="pool")(
        [keras.layers.GlobalAveragePooling2D(name="gap")(x), keras.layers.GlobalMaxPooling2D(name="gmp")(x)]
    )
    if dropout > 0:
        pooled = keras.layers.Dropout(dropout, name="dropout")(pooled)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(pooled)
    return keras.Model(inputs, outputs, name="linewatch_cnn")


def augment(images: np.ndarray, aug: Augmentation, rng: np.random.Generator) -> np.ndarray:
    """Float images (N, H, W, C) in [0, 1] -> a randomly changed copy, still in [0, 1]."""
    x = images.copy()
    n = len(x)
    if n == 0:
        return x
    if aug.flips:
        lr = rng.random(n) < 0.5
        x[lr] = x[lr, :, ::-1]
        ud = rng.random(n) < 0.5
        x[ud] = x[ud, ::-1, :]
    if aug.rot90 and x.shape[1] == x.shape[2]:
        k = rng.integers(0, 4, n)
        for turns in (1, 2, 3):
            sel = k == turns
            if sel.any():
                x[sel] = np.rot90(x[sel], turns, axes=(1, 2))
    if aug.contrast > 0:
        c = rng.uniform(1 - aug.contrast, 1 + aug.contrast, (n, 1, 1, 1)).astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * c + mean
    if aug.brightness > 0:
        x = x + rng.uniform(-aug.brightness, aug.brightness, (n, 1, 1, 1)).astype(np.float32)
    if aug.noise > 0:
        sigma = rng.uniform(0, aug.noise, (n, 1, 1, 1)).astype(np.float32)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights n / (k * n_c): each class counts as much as the others in the loss."""
    counts = np.bincount(y, minlength=num_classes).astype(float)
    n = float(counts.sum())
    return {c: (n / (num_classes * counts[c]) if counts[c] else 0.0) for c in range(num_classes)}


def predict_proba(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Float model probabilities (N, classes) for float inputs in [0, 1]."""
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), dtype=np.float32)
    out = [np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _weighted_loss(probs: np.ndarray, y: np.ndarray, weights: dict[int, float]) -> float:
    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    w = np.array([weights[int(c)] for c in y])
    return float(np.sum(-np.log(p) * w) / max(np.sum(w), 1e-12))


def _balanced_accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    pred = probs.argmax(axis=1)
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls)) if recalls else 0.0


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    *,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> TrainResult:
    """Train from float inputs in [0, 1] with class weighting and early stopping on val loss.

    The weights of the epoch with the lowest (class-weighted) validation loss are restored.
    Same arrays + same ``config`` give the same weights: seeds are set here, TF ops are
    deterministic, shuffling and augmentation come from ``numpy`` generators seeded per epoch.
    """
    set_seed(config.seed)
    t_start = time.perf_counter()
    model = build_model(
        num_classes,
        height=x_train.shape[1],
        width=x_train.shape[2],
        channels=x_train.shape[3],
        filters=config.width,
        dropout=config.dropout,
    )
    weights = class_weights(y_train, num_classes)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history: list[EpochLog] = []
    best_loss = math.inf
    best_weights: list[np.ndarray] | None = None
    best_epoch = 0
    stale = 0
    sample_w = np.array([weights[int(c)] for c in y_train], dtype=np.float32)
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        # Cosine decay per epoch, down to 5 % of the initial rate.
        frac = (epoch - 1) / max(1, config.epochs - 1)
        lr = config.learning_rate * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        optimizer.learning_rate.assign(lr)
        rng = np.random.default_rng([config.seed, epoch])
        order = rng.permutation(len(x_train))
        xb = augment(x_train[order], config.augmentation, rng)
        # A plain batched dataset (no map stage): already shuffled and augmented above.
        data = tf.data.Dataset.from_tensor_slices((xb, y_train[order], sample_w[order])).batch(config.batch_size)
        fit = model.fit(data, epochs=1, shuffle=False, verbose=0)
        probs = predict_proba(model, x_val)
        val_loss = _weighted_loss(probs, y_val, weights)
        improved = val_loss < best_loss - 1e-4
        if improved:
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_weights = [w.copy() for w in model.get_weights()]
        else:
            stale += 1
        log = EpochLog(
            epoch=epoch,
            loss=float(fit.history["loss"][-1]),
            accuracy=float(fit.history["accuracy"][-1]),
            val_loss=val_loss,
            val_accuracy=_balanced_accuracy(probs, y_val),
            seconds=time.perf_counter() - t0,
            best=improved,
        )
        history.append(log)
        logger.debug("epoch %s: %s", epoch, log)
        if on_epoch is not None:
            on_epoch(log)
        if stale >= config.patience and epoch >= config.min_epochs:
            break
    if best_weights is not None:
        model.set_weights(best_weights)
    return TrainResult(
        model=model,
        history=tuple(history),
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=len(history) < config.epochs,
        seconds=time.perf_counter() - t_start,
    )


def model_summary(model: keras.Model) -> dict[str, Any]:
    """Parameter count and layer names, for the manifest."""
    return {"name": model.name, "parameters": int(model.count_params()), "layers": len(model.layers)}


__all__: Sequence[str] = [
    "Augmentation",
    "EpochLog",
    "TrainConfig",
    "TrainResult",
    "augment",
    "build_model",
    "class_weights",
    "predict_proba",
    "set_seed",
    "train_model",
]
