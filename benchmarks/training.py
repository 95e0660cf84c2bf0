"""Training benchmark: default synthetic fit, and the real magnetic-tile set.

    .venv/bin/python benchmarks/training.py [--out bench-out] [--skip-synth] [--skip-tiles]

(a) ``linewatch train synth`` defaults -> ``linewatch train fit`` defaults: training time,
    float vs int8 test metrics, model size, and int8 vs float32 invoke p50/p99 with the same
    runtime in the same run, for every runtime that imports here (one thread each).
    Targets: int8 defect recall >= 0.99 at a false reject rate <= 2 %; int8 balanced accuracy
    within 1.0 point of float; int8 p50 <= 0.6 x float32 p50.
(b) ../shared/datasets/magnetic-tile (or $LINEWATCH_TILES): ok vs every defect class, split
    by groups so the several exposures of one tile never straddle train/val/test (file names
    ``exp<E>_num_<N>.jpg``: numbers within 100 of a neighbour are one group, see
    ``training.dataset.number_groups``). Target: int8 balanced accuracy >= 0.95. Skipped with
    a message when the folder is missing.

Prints one JSON object and writes it to OUT/training.json. Progress goes to stderr.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

TILES = Path(os.environ.get("LINEWATCH_TILES", REPO.parent / "shared" / "datasets" / "magnetic-tile"))
LATENCY_INVOKES = 500


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def runtimes_available() -> list[str]:
    from edge.exceptions import RuntimeUnavailable
    from edge.inference import RUNTIMES, load_runtime

    names = []
    for name, _ in RUNTIMES:
        try:
            load_runtime(name)
        except (RuntimeUnavailable, AttributeError) as exc:  # AttributeError: see docs/training.md
            log(f"    runtime {name} not usable here: {type(exc).__name__}: {exc}")
            continue
        names.append(name)
    return names


def latency(bundle: Path, runtime: str) -> dict[str, Any]:
    """int8 (edge Classifier) and float32 twin, same runtime, one thread, same golden inputs."""
    from edge.inference import Classifier
    from edge.preprocess import read_image, resize_uint8, to_float
    from edge.protocol import read_manifest
    from training.bundle import FLOAT_MODEL_FILE
    from training.export import FloatTFLite, quiet_native_output

    manifest = read_manifest(bundle)
    images = [read_image(bundle / g.file) for g in manifest.golden]
    with quiet_native_output():
        clf = Classifier(bundle, runtime=runtime, num_threads=1)
        flt = FloatTFLite((bundle / "report" / FLOAT_MODEL_FILE).read_bytes(), num_threads=1, runtime=runtime)
    q = [clf.quantize(im) for im in images]
    f = [to_float(resize_uint8(im, manifest.preprocessing), manifest.preprocessing)[None, ...] for im in images]

    def measure(fn: Any, batches: list[np.ndarray]) -> dict[str, float]:
        for b in batches:
            fn(b)
        times = []
        for i in range(LATENCY_INVOKES):
            t0 = time.perf_counter()
            fn(batches[i % len(batches)])
            times.append((time.perf_counter() - t0) * 1000)
        return {"p50_ms": round(float(np.percentile(times, 50)), 4), "p99_ms": round(float(np.percentile(times, 99)), 4)}

    # Interleave int8 and float rounds so a busy neighbour on the machine hits both alike.
    rounds: dict[str, list[dict[str, float]]] = {"int8": [], "float32": []}
    for _ in range(3):
        rounds["int8"].append(measure(clf.invoke, q))
        rounds["float32"].append(measure(flt.invoke, f))
    best = {k: min(v, key=lambda r: r["p50_ms"]) for k, v in rounds.items()}
    ratio = best["int8"]["p50_ms"] / best["float32"]["p50_ms"] if best["float32"]["p50_ms"] else None
    return {
        "runtime": runtime,
        "threads": 1,
        "invokes_per_round": LATENCY_INVOKES,
        "rounds": 3,
        "int8": best["int8"],
        "float32": best["float32"],
        "int8_over_float_p50": None if ratio is None else round(ratio, 3),
    }


def summarize_fit(bundle: Path, seconds: float) -> dict[str, Any]:
    from edge.protocol import read_manifest

    m = read_manifest(bundle)
    keys = (
        "n",
        "balanced_accuracy",
        "accuracy",
        "defect_recall",
        "false_reject_rate",
        "defect_precision",
        "roc_auc",
        "pr_auc",
        "threshold",
    )
    return {
        "bundle": str(bundle),
        "fit_seconds": round(seconds, 1),
        "train_seconds": m.training["durations_s"].get("train"),
        "epochs_run": m.training["epochs_run"],
        "best_epoch": m.training["best_epoch"],
        "parameters": m.training["parameters"],
        "input": list(m.input.shape),
        "model_bytes": m.model.bytes,
        "float_model_bytes": (bundle / "report" / "model_float32.tflite").stat().st_size,
        "split": m.dataset["split"]["sizes"],
        "split_method": m.dataset["split"]["method"],
        "operating_point": m.operating_point.model_dump() if m.operating_point else None,
        "float": {k: m.metrics["float"].get(k) for k in keys},
        "int8": {k: m.metrics["int8"].get(k) for k in keys}
        | {"confusion": m.metrics["int8"]["confusion"], "per_class_recall": m.metrics["int8"]["per_class_recall"]},
        "quantization_gate": m.metrics["quantization_gate"],
    }


def threshold_free(bundle: Path) -> dict[str, Any]:
    """For information: the best balanced accuracy any threshold reaches on test (not a deployable figure)."""
    from training.evaluate import compute_metrics

    scores = json.loads((bundle / "report" / "metrics.json").read_text())["test_scores"]
    labels, s = scores["labels"], np.array(scores["int8"])
    best = max(
        (compute_metrics(labels, s, scores["pass_label"], float(t)) for t in np.unique(s)),
        key=lambda m: m["balanced_accuracy"] or 0,
    )
    return {k: best[k] for k in ("threshold", "balanced_accuracy", "defect_recall", "false_reject_rate")}


def faint_breakdown(bundle: Path, data: Path) -> dict[str, Any]:
    """int8 test figures for faint and clearly visible scratches apart (synth.json says which)."""
    from training.evaluate import roc_auc

    scores = json.loads((bundle / "report" / "metrics.json").read_text())["test_scores"]
    faint = {m["file"]: m["faint"] for m in json.loads((data / "synth.json").read_text())["images"]}
    threshold = json.loads((bundle / "manifest.json").read_text())["threshold"]
    s = np.array(scores["int8"])
    kind = np.array(["ok" if lab == scores["pass_label"] else ("faint" if faint["/".join(Path(f).parts[-2:])] else "clear")
                     for f, lab in zip(scores["files"], scores["labels"], strict=True)])
    out: dict[str, Any] = {}
    for k in ("clear", "faint"):
        sel = kind == k
        if sel.any():
            both = sel | (kind == "ok")
            out[k] = {"n": int(sel.sum()), "recall_at_threshold": round(float(np.mean(s[sel] >= threshold)), 4),
                      "roc_auc_vs_ok": round(roc_auc(kind[both] == k, s[both]), 4)}
    clear = np.sort(s[kind == "clear"])
    if clear.size:  # what a 99 %-recall threshold on the clear scratches alone would cost on test
        t = clear[int(np.floor(0.01 * clear.size))]
        out["false_reject_rate_at_99pct_recall_of_clear"] = round(float(np.mean(s[kind == "ok"] >= t)), 4)
    return out


def held_out_synth(bundle: Path, out: Path, count: int = 2000, seed: int = 1) -> dict[str, Any]:
    """The bundle through `train eval` on a second synthetic set drawn with another seed."""
    from training.evaluate import evaluate_bundle
    from training.synth import SYNTH_VERSION, generate_dataset

    data = out / f"synth-eval-seed{seed}"
    meta = data / "synth.json"
    wanted = {"count": count, "seed": seed, "version": SYNTH_VERSION}
    if not (meta.is_file() and all(json.loads(meta.read_text()).get(k) == v for k, v in wanted.items())):
        log(f"(a) generating {count} held-out synthetic images (seed {seed}) in {data}")
        generate_dataset(data, count=count, seed=seed)
    r = evaluate_bundle(bundle, data)
    keys = ("n", "balanced_accuracy", "defect_recall", "false_reject_rate", "roc_auc", "threshold", "recall_by_visibility")
    return {"data": str(data), **{k: r.get(k) for k in keys}}


def run_fit(data: Path, bundle: Path, **options: Any) -> tuple[Path, float, Any]:
    from training.exceptions import QuantizationGateError
    from training.pipeline import FitOptions, fit

    t0 = time.perf_counter()
    try:
        result = fit(data, bundle, FitOptions(**options), echo=lambda line: log("  " + line))
        gate_error = None
    except QuantizationGateError as exc:
        result, gate_error = None, str(exc)
    return bundle, time.perf_counter() - t0, gate_error or result


def bench_synth(out: Path) -> dict[str, Any]:
    from training.cli import DEFAULT_SYNTH_COUNT
    from training.synth import SYNTH_VERSION, generate_dataset

    data = out / "synth-data"
    meta = data / "synth.json"
    wanted = {"count": DEFAULT_SYNTH_COUNT, "seed": 0, "version": SYNTH_VERSION}
    if not (meta.is_file() and all(json.loads(meta.read_text()).get(k) == v for k, v in wanted.items())):
        log(f"(a) generating {DEFAULT_SYNTH_COUNT} synthetic images (seed 0) in {data}")
        t0 = time.perf_counter()
        generate_dataset(data, count=DEFAULT_SYNTH_COUNT, seed=0)
        log(f"    {time.perf_counter() - t0:.1f}s")
    log("(a) linewatch train fit (defaults)")
    bundle, seconds, _ = run_fit(data, out / "bundle-synth", version="bench-synth")
    result = summarize_fit(bundle, seconds)
    result["latency"] = [latency(bundle, r) for r in runtimes_available()]
    result["by_scratch_kind"] = faint_breakdown(bundle, data)
    result["held_out"] = held_out_synth(bundle, out)
    i8, fl = result["int8"], result["float"]
    lat = result["latency"][0] if result["latency"] else {}
    held = result["held_out"]
    result["targets"] = {
        "int8_defect_recall>=0.99": (i8["defect_recall"] or 0) >= 0.99,
        "int8_false_reject_rate<=0.02": (i8["false_reject_rate"] if i8["false_reject_rate"] is not None else 1) <= 0.02,
        "held_out_recall>=0.99_at_frr<=0.02": (held["defect_recall"] or 0) >= 0.99 and (held["false_reject_rate"] or 1) <= 0.02,
        # as the quantization gate judges it: both models at the shipped threshold
        "int8_balanced_accuracy_within_1pt": bool(result["quantization_gate"]["passed"])
        and not result["quantization_gate"].get("allowed_by_flag"),
        "int8_balanced_accuracy_within_1pt_each_at_own_threshold": (fl["balanced_accuracy"] or 0)
        - (i8["balanced_accuracy"] or 0) <= 0.01,
        "int8_p50<=0.6xfloat_p50": (lat.get("int8_over_float_p50") or 99) <= 0.6,
        "fit_under_600s": seconds <= 600,
    }
    return result


def bench_tiles(out: Path, epochs: int, filters: int, size: int = 128) -> dict[str, Any]:
    if not TILES.is_dir():
        msg = f"skipped: {TILES} not found (set LINEWATCH_TILES to the magnetic-tile folder)"
        log("(b) " + msg)
        return {"skipped": msg}
    log(f"(b) magnetic tiles from {TILES}: ok vs every defect (merged), grouped split by file number (gap 100), "
        f"up to {epochs} epochs, {filters} first-layer filters, {size}x{size} input")
    # No time target on this set, and it keeps improving long after the synthetic default's 40 epochs.
    bundle, seconds, _ = run_fit(TILES, out / "bundle-tiles", version="bench-tiles", group_by="number", group_gap=100,
                                 epochs=epochs, patience=max(8, epochs // 4), filters=filters, size=size,
                                 allow_quantization_drop=True)
    result = summarize_fit(bundle, seconds)
    result["data"] = str(TILES)
    result["grouping"] = "tiles grouped by file number: sorted numbers, new group at a jump > 100 (exposures of one tile sit 10-90 apart)"
    result["int8_best_threshold_on_test"] = threshold_free(bundle)
    result["targets"] = {"int8_balanced_accuracy>=0.95": (result["int8"]["balanced_accuracy"] or 0) >= 0.95}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench-out")
    parser.add_argument("--skip-synth", action="store_true")
    parser.add_argument("--skip-tiles", action="store_true")
    parser.add_argument("--tiles-filters", type=int, default=8, help="first-layer filters for the magnetic-tile fit")
    parser.add_argument("--tiles-size", type=int, default=192, help="model input side for the magnetic-tile fit (tiles are 200-600 px)")
    parser.add_argument("--tiles-epochs", type=int, default=60, help="epochs for the magnetic-tile fit (patience a quarter of it)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf

    # A partial run (--skip-...) keeps the other section of an earlier run.
    earlier = args.out / "training.json"
    report: dict[str, Any] = json.loads(earlier.read_text()) if earlier.exists() else {}
    report |= {
        "benchmark": "training",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "tensorflow": tf.__version__,
        },
    }
    if not args.skip_synth:
        report["synth"] = bench_synth(args.out)
    if not args.skip_tiles:
        report["magnetic_tile"] = bench_tiles(args.out, args.tiles_epochs, args.tiles_filters, args.tiles_size)
    text = json.dumps(report, indent=2)
    (args.out / "training.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
