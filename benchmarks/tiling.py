"""Benchmark: a tiled bundle deciding 1920x1080 frames on the box (issue 19, "Box speed").

    .venv/bin/python benchmarks/tiling.py [--frames 200] [--threads 2] [--stems pool strided] [--filters 16 8]

Trains throw-away tiled bundles (128x128 model inputs, 16 and 8 first-layer filters, the
pool and the strided stem, one epoch on small generated pictures: speed does not depend on the weights), then times
``Classifier.predict`` (cut + lookup table + one batched invoke + max) on full-HD frames
with LiteRT, for several scales and overlaps (the manifest's tiling is rewritten: the
model is the same). Also compares one batched invoke per frame with one invoke per tile.
Reports per-frame decision p50/p99, frames/s flat out, tiles/s and the share of the
decision spent cutting tiles.

Prints one JSON object and writes it to bench-out/tiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench-out"

import numpy as np  # noqa: E402

# (scale, overlap) variants timed on the same model
VARIANTS = [(1.0, 0.25), (1.0, 0.0), (0.5, 0.25), (0.5, 0.0)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                vnni = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AVX-512 VNNI)" if vnni else " (no VNNI)")
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_bundle(out: Path, filters: int, stem: str) -> Path:
    from training.pipeline import FitOptions, fit
    from training.tiny import draw_line_pictures

    with tempfile.TemporaryDirectory(prefix="lw-tiling-") as tmp:
        draw_line_pictures(Path(tmp), count=60, seed=0, size=(320, 256))
        fit(
            Path(tmp),
            out,
            FitOptions(tile=(128, 128), filters=filters, stem=stem, epochs=1, folds=0, allow_quantization_drop=True, latency_samples=5),
            echo=lambda line: None,
        )
    return out


def frame(seed: int) -> np.ndarray:
    """A 1920x1080 BGR frame with texture (cutting cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 12, (1080, 1920)).clip(0, 255).astype(np.uint8)
    return np.repeat(base[:, :, None], 3, axis=2)


def with_tiling(bundle: Path, dest: Path, scale: float, overlap: float) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["tiling"].update({"scale": scale, "overlap": overlap})
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def time_variant(bundle: Path, frames: list[np.ndarray], n: int, threads: int) -> dict[str, Any]:
    from edge.inference import Classifier

    clf = Classifier(bundle, num_threads=threads)
    for f in frames[:3]:
        clf.predict(f)
    totals, cuts, invokes = [], [], []
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        pred = clf.predict(frames[i % len(frames)])
        totals.append((time.perf_counter() - t0) * 1000.0)
        cuts.append(pred.preprocess_ms)
        invokes.append(pred.invoke_ms)
    wall = time.perf_counter() - t_all
    tiles = len(pred.tile_raws or ())
    return {
        "inputs_per_frame": tiles,
        "decision_p50_ms": round(float(np.percentile(totals, 50)), 2),
        "decision_p99_ms": round(float(np.percentile(totals, 99)), 2),
        "frames_per_s": round(n / wall, 1),
        "tiles_per_s": round(n * tiles / wall, 0),
        "cut_share": round(float(np.sum(cuts) / np.sum(totals)), 3),
        "invoke_share": round(float(np.sum(invokes) / np.sum(totals)), 3),
    }


def batch_vs_loop(bundle: Path, image: np.ndarray, n: int, threads: int) -> dict[str, Any]:
    """One invoke over all of a frame's tiles against one invoke per tile, interleaved."""
    from edge import tiling
    from edge.inference import Classifier

    batched = Classifier(bundle, num_threads=threads)
    single = Classifier(bundle, num_threads=threads)
    inputs, _ = tiling.cut(image, batched.manifest.tiling, "gray")
    q = batched.quantize_inputs(inputs)
    batched.invoke_batch(q)
    for row in q[:3]:
        single.invoke(row[None])
    a, b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        batched.invoke_batch(q)
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for row in q:
            single.invoke(row[None])
        b.append(time.perf_counter() - t0)
    pa, pb = float(np.median(a)) * 1000, float(np.median(b)) * 1000
    return {"inputs": len(q), "batched_p50_ms": round(pa, 2), "per_tile_p50_ms": round(pb, 2), "batched_over_per_tile": round(pa / pb, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stems", nargs="+", default=["pool", "strided"], choices=["pool", "strided"])
    parser.add_argument("--filters", nargs="+", type=int, default=[16, 8])
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    frames = [frame(s) for s in range(4)]
    result: dict[str, Any] = {"cpu": cpu_name(), "threads": args.threads, "frame": "1920x1080", "models": {}}
    with tempfile.TemporaryDirectory(prefix="lw-tiling-bundles-") as tmp:
        for filters, stem in [(f, s) for f in args.filters for s in args.stems]:
            name = f"filters {filters}, {stem} stem"
            bundle = build_bundle(Path(tmp) / f"f{filters}-{stem}", filters, stem)
            rows = {}
            for scale, overlap in VARIANTS:
                variant = with_tiling(bundle, Path(tmp) / f"f{filters}-s{scale}-o{overlap}", scale, overlap)
                rows[f"scale {scale:g}, overlap {overlap:g}"] = time_variant(variant, frames, args.frames, args.threads)
                print(f"{name}, scale {scale:g}, overlap {overlap:g}: {rows[f'scale {scale:g}, overlap {overlap:g}']}", flush=True)
            loop = batch_vs_loop(with_tiling(bundle, Path(tmp) / "bl", 0.5, 0.0), frames[0], 30, args.threads)
            print(f"{name}, batch vs loop at scale 0.5: {loop}", flush=True)
            result["models"][name] = {"variants": rows, "batch_vs_loop_scale_0.5": loop}
    (OUT / "tiling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
