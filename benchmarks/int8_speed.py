"""Benchmark: when is full-integer int8 faster than float32 on this CPU?

    .venv/bin/python benchmarks/int8_speed.py [--invokes 300]

Issue 2 asks for int8 invoke p50 <= 0.6 x float32 p50 with the same runtime. This script
separates the model from the hardware: it converts Conv-BN-ReLU stacks of growing width
(random weights, calibrated on random images: speed does not depend on the weights) to
float32 and int8 TFLite with the same converter settings the trainer uses, and times both
with LiteRT on one thread, default delegates (XNNPACK), in the same run, interleaved.

On x86 without AVX-512 VNNI / AVX-VNNI, XNNPACK's int8 kernels widen to 16 bits and do
little better than float32 FMA; int8 pays off only once convolutions are large (hundreds of
MMACs). ARM cores with dot-product instructions (the usual edge box) behave differently.

Prints one JSON object and writes it to bench-out/int8_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench-out"

import numpy as np  # noqa: E402

# (name, input (H, W, C), conv widths): from the shipped model's scale up to a heavy GEMM.
CASES: list[tuple[str, tuple[int, int, int], tuple[int, ...]]] = [
    ("shipped-like 128x128x1, 8-16-32", (128, 128, 1), (8, 16, 32)),
    ("128x128x1, 16-32-64", (128, 128, 1), (16, 32, 64)),
    ("56x56x32, 3 x 32", (56, 56, 32), (32, 32, 32)),
    ("56x56x64, 3 x 64", (56, 56, 64), (64, 64, 64)),
    ("56x56x128, 3 x 128", (56, 56, 128), (128, 128, 128)),
]


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "fma", "neon", "asimd")) or "vnni" in f)


def build(shape: tuple[int, int, int], widths: tuple[int, ...]) -> Any:
    import keras

    inputs = keras.Input(shape)
    x = inputs
    for i, w in enumerate(widths):
        x = keras.layers.Conv2D(w, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.ReLU()(x)
        if shape[0] > 64 and i < len(widths) - 1:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))


def convert(model: Any, shape: tuple[int, int, int], int8: bool) -> bytes:
    import tensorflow as tf

    from training.native import quiet_native_output

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(0)

        def representative() -> Any:
            for _ in range(30):
                yield [rng.random((1, *shape), dtype=np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with quiet_native_output():
        return bytes(converter.convert())


def interpreter(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    from training.native import quiet_native_output

    with quiet_native_output():
        it = Interpreter(model_content=model, num_threads=1)
        it.allocate_tensors()
    detail = it.get_input_details()[0]
    it.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    for _ in range(20):
        it.invoke()
    return it


def timed(it: Any) -> float:
    t0 = time.perf_counter()
    it.invoke()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--invokes", type=int, default=300)
    args = ap.parse_args()
    rows = []
    for name, shape, widths in CASES:
        model = build(shape, widths)
        macs = 0
        h, w, c = shape
        for i, out in enumerate(widths):
            macs += h * w * 9 * c * out
            c = out
            if shape[0] > 64 and i < len(widths) - 1:
                h, w = h // 2, w // 2
        f_it, q_it = interpreter(convert(model, shape, False)), interpreter(convert(model, shape, True))
        f_ts, q_ts = [], []
        for _ in range(args.invokes):  # interleaved: both see the same machine load
            f_ts.append(timed(f_it))
            q_ts.append(timed(q_it))
        f50, q50 = float(np.median(f_ts) * 1e3), float(np.median(q_ts) * 1e3)
        row = {"case": name, "mmacs": round(macs / 1e6, 1), "float32_p50_ms": round(f50, 3),
               "int8_p50_ms": round(q50, 3), "int8_over_float": round(q50 / f50, 2)}  # fmt: skip
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": cpu_flags()},
        "runtime": "ai-edge-litert, default delegates (XNNPACK), 1 thread",
        "load": os.getloadavg()[0],
        "cases": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "int8_speed.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
