"""Benchmark: the first convolution's int8 cost, and the 2026-12-07 stem experiment.

    .venv/bin/python benchmarks/first_layer.py

XNNPACK's int8 convolution is slow with one input channel: on the shipped model's
128x128x1 input the first 3x3 convolution (1 -> 16) is the largest part of the int8
invoke while costing little in float. This times, with LiteRT on one thread, int8 and
float32 versions (random weights, converted with the trainer's converter settings) of:
that convolution; the same on two channels (the map head's [image, level] input); the
same as a depthwise convolution with 16 multipliers; and
space-to-depth (2x2 pixels -> 4 channels at 64x64) followed by a 3x3 4 -> 16
convolution, which replaces convolution + 2x2 max pool. Figures in docs/benchmarks.md
(Training). Not in `make bench`'s default list: run it by name.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from int8_speed import interpreter  # noqa: E402  (the same warmed-up LiteRT, 1 thread)


def p50_ms(its: tuple[Any, Any], invokes: int = 400) -> tuple[float, float]:
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(invokes):  # interleaved: both see the same load
        for it, ts in zip(its, times, strict=True):
            t0 = time.perf_counter()
            it.invoke()
            ts.append(time.perf_counter() - t0)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


def main() -> None:
    import keras
    import tensorflow as tf

    from training.export import convert_float, convert_int8

    rep = np.random.default_rng(0).random((40, 128, 128, 1)).astype(np.float32)
    relu6 = keras.layers.ReLU(6.0)
    cases: list[tuple[str, Callable[[Any], Any]]] = [
        ("conv 3x3 1->16 at 128x128", lambda x: relu6(keras.layers.Conv2D(16, 3, padding="same")(x))),
        ("depthwise 3x3 x16 at 128x128", lambda x: relu6(keras.layers.DepthwiseConv2D(3, depth_multiplier=16, padding="same")(x))),
        ("conv 3x3 2->16 at 128x128 (image and level, LocalContrastConv)",
         lambda x: relu6(keras.layers.Conv2D(16, 3, padding="same")(keras.layers.Concatenate()([x, x])))),
        ("space-to-depth, conv 3x3 4->16 at 64x64",
         lambda x: relu6(keras.layers.Conv2D(16, 3, padding="same")(keras.layers.Lambda(lambda t: tf.nn.space_to_depth(t, 2))(x)))),
    ]
    rows = []
    for name, layer in cases:
        inputs = keras.Input((128, 128, 1))
        model = keras.Model(inputs, layer(inputs))
        q, f = p50_ms((interpreter(convert_int8(model, rep)), interpreter(convert_float(model))))
        row = {"case": name, "int8_p50_ms": round(q, 3), "float32_p50_ms": round(f, 3), "int8_over_float": round(q / f, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(json.dumps({"load": os.getloadavg()[0], "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
