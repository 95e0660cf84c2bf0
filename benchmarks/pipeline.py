"""Edge pipeline benchmark: the agent on a 640x480 video against its own stages.

Measures, in one run on one machine:
  - decode alone (cv2.VideoCapture over the file), frames/s
  - preprocess+invoke alone (edge.inference.Classifier), frames/s, invoke p50/p99
  - the real agent process (`linewatch edge run --echo`, durable FULL commits):
    sustained frames/s, decision latency p50/p99 (frame grabbed -> committed),
    peak RSS, start-to-first-decision
Targets (issue 3): agent fps >= 0.8 x slowest stage; latency p99 <= invoke p99 + 5 ms;
RSS <= 250 MB; first decision <= 3 s.

    python benchmarks/pipeline.py [--bundle DIR] [--frames N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench-out"


def default_bundle() -> Path:
    """The trained benchmark bundle if there is one, else a tiny one made now."""
    for candidate in (OUT / "bundle-synth", REPO / "demo-out" / "bundle-v1"):
        if (candidate / "manifest.json").exists():
            return candidate
    from training.tiny import make_tiny_bundle

    target = OUT / "bundle-tiny"
    if not (target / "manifest.json").exists():
        make_tiny_bundle(target)
    return target


def render(path: Path, frames: int) -> None:
    from training.synth import render_video

    render_video(path, parts=frames, seed=3, fps=30, size=(640, 480))


def decode_rate(path: Path) -> float:
    cap = cv2.VideoCapture(str(path))
    n, t0 = 0, time.perf_counter()
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n / (time.perf_counter() - t0)


def model_rate(bundle: Path, path: Path) -> dict[str, float]:
    from edge.inference import Classifier

    clf = Classifier(bundle, num_threads=1)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < 200:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    for f in frames[:20]:
        clf.predict(f)
    invoke, total = [], []
    t0 = time.perf_counter()
    for f in frames:
        p = clf.predict(f)
        invoke.append(p.invoke_ms)
        total.append(p.invoke_ms + p.preprocess_ms)
    elapsed = time.perf_counter() - t0
    return {
        "fps": len(frames) / elapsed,
        "invoke_p50_ms": float(np.percentile(invoke, 50)),
        "invoke_p99_ms": float(np.percentile(invoke, 99)),
        "pre_invoke_p50_ms": float(np.percentile(total, 50)),
        "runtime": clf.runtime,
    }


def agent_run(
    bundle: Path, video: Path, work: Path, frames: int, fps: float | None = None, synchronous: str = "FULL"
) -> dict[str, float]:
    cfg = work / "agent.toml"
    (work / "buffer.db").unlink(missing_ok=True)
    pace = f"fps = {fps}\n" if fps else ""
    cfg.write_text(
        f'device_id = "bench"\n[camera]\nsource = "{video}"\n{pace}[model]\npath = "{bundle}"\n'
        f'[buffer]\npath = "{work / "buffer.db"}"\nsynchronous = "{synchronous}"\n[mqtt]\nenabled = false\n'
    )
    exe = Path(sys.executable).parent / "linewatch"
    t_start = time.perf_counter()
    proc = subprocess.Popen([str(exe), "edge", "run", "--config", str(cfg), "--echo"], stdout=subprocess.PIPE, text=True, bufsize=1)
    assert proc.stdout is not None
    stamps, lat = [], []
    first = None
    rss_kb = 0
    while len(stamps) < frames:
        line = proc.stdout.readline()
        if not line:
            break
        now = time.perf_counter()
        if first is None:
            first = now - t_start
        stamps.append(now)
        lat.append(json.loads(line)["latency_ms"])
        if len(stamps) % 50 == 0:
            rss_kb = max(rss_kb, _rss_kb(proc.pid))
    rss_kb = max(rss_kb, _hwm_kb(proc.pid))
    proc.terminate()
    proc.wait(10)
    # skip the first 10 decisions: model warm-up and queue fill
    span = stamps[-1] - stamps[10]
    return {
        "frames": len(stamps),
        "fps": (len(stamps) - 11) / span,
        "latency_p50_ms": float(np.percentile(lat[10:], 50)),
        "latency_p99_ms": float(np.percentile(lat[10:], 99)),
        "rss_peak_mb": rss_kb / 1024,
        "first_decision_s": float(first or 0.0),
    }


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--frames", type=int, default=600)
    args = ap.parse_args()
    bundle = args.bundle or default_bundle()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        video = work / "line.avi"
        render(video, args.frames)
        decode = decode_rate(video)
        model = model_rate(bundle, video)
        # flat out: sustained throughput (the reader runs ahead, so latency includes queueing)
        agent = agent_run(bundle, video, work, args.frames)
        # paced like a live camera at 30 fps: decision latency without queueing
        paced = agent_run(bundle, video, work, min(args.frames, 300), fps=30)
        # the same with synchronous=NORMAL: how much of that latency is the fsync
        paced_normal = agent_run(bundle, video, work, min(args.frames, 300), fps=30, synchronous="NORMAL")
    slowest = min(decode, model["fps"])
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "bundle": str(bundle),
        "decode_fps": decode,
        "model": model,
        "agent": agent,
        "agent_paced_30fps": paced,
        "agent_paced_30fps_sync_normal": paced_normal,
        "slowest_stage_fps": slowest,
        "agent_vs_slowest": agent["fps"] / slowest,
        "latency_p99_minus_invoke_p99_ms": paced["latency_p99_ms"] - model["invoke_p99_ms"],
        "targets": {
            "fps_ratio>=0.8": agent["fps"] / slowest >= 0.8,
            "latency_p99<=invoke_p99+5ms": paced["latency_p99_ms"] <= model["invoke_p99_ms"] + 5,
            "rss<=250MB": agent["rss_peak_mb"] <= 250,
            "first_decision<=3s": agent["first_decision_s"] <= 3,
        },
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "pipeline.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
