"""Keras model -> full-integer int8 TFLite (what ships) and float32 TFLite (for comparison).

Post-training quantization calibrates activation ranges on a representative set drawn
from the *training* split only (validation and test stay unseen), with integer-only
builtins so the model runs on any LiteRT build, and int8 input and output tensors so
the edge quantizes pixels with a lookup table and never touches float math per pixel.

Imports TensorFlow: import this module only inside commands that train.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from edge.inference import load_runtime  # noqa: E402
from training.exceptions import ExportError  # noqa: E402
from training.model import int8_native_rounding  # noqa: E402
from training.native import quiet_native_output  # noqa: E402

logger = logging.getLogger(__name__)

REPRESENTATIVE_COUNT = 300


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a converted model as the manifest describes it."""

    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``input`` or ``output`` entry."""
        return {"shape": list(self.shape), "dtype": self.dtype, "scale": self.scale, "zero_point": self.zero_point}


def representative_subset(x_train: np.ndarray, count: int = REPRESENTATIVE_COUNT, seed: int = 0) -> np.ndarray:
    """Up to ``count`` training images (float, [0, 1]) chosen with ``seed``, for calibration."""
    if len(x_train) <= count:
        return x_train
    idx = np.sort(np.random.default_rng([seed, 7]).choice(len(x_train), size=count, replace=False))
    return x_train[idx]


def _converter(model: Any) -> tf.lite.TFLiteConverter:
    """A converter for the Keras model (the interpreter's input is [1, H, W, C]: one frame per invoke).

    ``from_keras_model``, not a traced ``tf.function``: with Keras 3 and TF 2.21 the traced
    path leaves READ_VARIABLE ops the int8 calibrator cannot run.
    """
    return tf.lite.TFLiteConverter.from_keras_model(model)


def _convert(converter: tf.lite.TFLiteConverter, what: str) -> bytes:
    try:
        with quiet_native_output() as log:
            data = bytes(converter.convert())
    except Exception as exc:  # noqa: BLE001 - the converter raises many unrelated types
        detail = " ".join("".join(log).split())[-300:] if log else ""
        raise ExportError(
            f"{what} conversion failed ({type(exc).__name__}: {exc}) {detail}; the model uses an op the converter "
            "cannot handle, check the TensorFlow version"
        ) from exc
    return data


def convert_int8(model: Any, representative: np.ndarray) -> bytes:
    """Full-integer post-training quantization: int8 weights, activations, input and output."""
    if len(representative) == 0:
        raise ExportError("no representative images for int8 calibration; the training split is empty")

    def gen() -> Any:
        for image in representative:
            yield [image[None, ...].astype(np.float32)]

    with int8_native_rounding(model):  # traced (and calibrated) without its ROUND ops
        converter = _converter(model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        data = _convert(converter, "int8")
    inp, out = tensor_specs(data)
    if inp.dtype != "int8" or out.dtype != "int8":
        raise ExportError(f"converter produced {inp.dtype} input / {out.dtype} output, not int8; check the TensorFlow version")
    return data


def convert_float(model: Any) -> bytes:
    """Plain float32 TFLite of the same network (benchmarks and the float-vs-int8 comparison)."""
    return _convert(_converter(model), "float32")


def _interpreter(model_bytes: bytes, num_threads: int | None = None, runtime: str | None = None) -> tuple[Any, str]:
    """An allocated interpreter for ``model_bytes`` from the edge's runtime choice."""
    name, interpreter_cls = load_runtime(runtime)
    with quiet_native_output():
        interp = interpreter_cls(model_content=model_bytes, num_threads=num_threads)
        interp.allocate_tensors()
    return interp, name


def tensor_specs(model_bytes: bytes) -> tuple[TensorSpec, TensorSpec]:
    """(input, output) shape, dtype and quantization read from the converted model itself."""
    interp, _ = _interpreter(model_bytes)
    specs = []
    for detail in (interp.get_input_details()[0], interp.get_output_details()[0]):
        scale, zero = detail.get("quantization", (0.0, 0))
        specs.append(
            TensorSpec(
                shape=tuple(int(v) for v in detail["shape"]),
                dtype=np.dtype(detail["dtype"]).name,
                scale=float(scale),
                zero_point=int(zero),
            )
        )
    return specs[0], specs[1]


class FloatTFLite:
    """A float32 .tflite run through the same runtime the edge would pick."""

    def __init__(self, model_bytes: bytes, *, num_threads: int | None = None, runtime: str | None = None) -> None:
        self._interp, self.runtime = _interpreter(model_bytes, num_threads, runtime)
        self._in = self._interp.get_input_details()[0]["index"]
        self._out = self._interp.get_output_details()[0]["index"]

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        """One float batch of one (1, H, W, C) -> probabilities row."""
        self._interp.set_tensor(self._in, batch)
        self._interp.invoke()
        return np.asarray(self._interp.get_tensor(self._out)[0]).copy()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float images (N, H, W, C) -> probabilities (N, classes), one invoke per image."""
        return np.stack([self.invoke(image[None, ...].astype(np.float32)) for image in x]) if len(x) else np.zeros((0, 0))


__all__ = [
    "REPRESENTATIVE_COUNT",
    "quiet_native_output",
    "FloatTFLite",
    "TensorSpec",
    "convert_float",
    "convert_int8",
    "representative_subset",
    "tensor_specs",
]
