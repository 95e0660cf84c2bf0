"""Edge pipeline benchmark: the agent on a generated video against its own stages.

Measures, in one run on one machine, on one rendered MJPG video (640x480 by default,
``--size WxH`` for another frame size):
  - decode alone (cv2.VideoCapture over the file), frames/s
  - preprocess+invoke alone (edge.inference.Classifier, LiteRT on 1 thread) on the video's
    first frames, the ones the agent decides first: frames/s, invoke p50/p99; once with
    OpenCV on 1 thread as the agent runs it, once with OpenCV's own thread pool; the faster
    of the two is the reference. A tiled bundle (manifest ``tiling``) cuts each frame into
    its tiles and runs them in one batched invoke, as the agent does
  - both stages again after the flat-out agent run: the machine may be shared, so the
    agent is compared with the mean of the two measurements around it
  - the real agent process (`linewatch edge run --echo`, durable FULL commits) on the same
    video, flat out: sustained frames/s, peak RSS, start-to-first-decision, samples kept
  - the agent paced like a live camera: decision latency p50/p99 (frame read -> decision
    committed), in FULL (default) and in NORMAL. The pace is 30 fps, or 0.7 x the slower of
    decode and preprocess+invoke (OpenCV on 1 thread, as the agent runs it) when that is
    below 30: a camera faster than the model only measures queueing. The pace is printed
  - the disk's own floor: p50/p99 of a 4 KiB write + fdatasync loop in the buffer's folder,
    measured just before and after the paced FULL run (what one WAL commit must wait for)
Targets (issue 3): agent fps >= 0.8 x slowest stage; latency p99 <= invoke p99 + 5 ms
(the floor in FULL mode is invoke p99 + fsync p99); RSS <= 250 MB; first decision <= 3 s.
Issue 19: the same ratio with tiled bundles; RSS <= 300 MB for frames larger than 640x480.

The model is the trained benchmark bundle (bench-out/bundle-synth, from `linewatch train
fit`) when it exists, else the demo's, else a tiny 64 px model made now; `--bundle` picks
another. The bundle, its input size, tiling, inputs per frame and pass/fail mix are printed:
a model that fails most parts makes the agent encode a JPEG sample of each (up to
sampling.max_per_hour).

The video: a whole-frame bundle sees parts scaled up onto a belt (training.synth
render_frames), one frame per part, as before; a tiled bundle sees frames drawn at their
own resolution (``native``, what tiled bundles are trained on), each part riding the belt
for 5 frames (drawing a full-HD part takes about a second).

Frame counts: 1200 flat-out and 1800 paced frames (one minute at 30 fps), 300 for each
model-stage measurement. With a tiled bundle or frames larger than 640x480 a frame can take
40-300 ms, so a short probe (a few rendered frames through the Classifier) sets the
defaults instead: about 40 s flat out, 60 s per paced run and 8 s per model-stage
measurement, at least 60 frames (20 for the model stage); --frames and --paced-frames
still win. The model stage decodes its frames in chunks of at most 320 MB outside the
timing, so full-HD frames do not pile up in memory.

    python benchmarks/pipeline.py [--bundle DIR] [--size WxH] [--frames N] [--paced-frames N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench-out"

DEFAULT_SIZE = (640, 480)
DEFAULT_FRAMES = 1200  # flat out
DEFAULT_PACED_FRAMES = 1800  # per paced run: one minute at 30 fps (a p99 over fewer rests on a handful of frames)
DEFAULT_MODEL_FRAMES = 300  # per model-stage measurement
CAMERA_FPS = 30.0
PACE_SHARE = 0.7  # of the slower stage's frames/s, when the camera rate is more than it sustains
# Heavy runs (tiled bundle or large frames): seconds each part should take, and floors.
FLAT_S, PACED_S, MODEL_S = 40.0, 60.0, 8.0
MIN_AGENT_FRAMES, MIN_MODEL_FRAMES = 60, 20
NATIVE_FRAMES_PER_PART = 5
CHUNK_BYTES = 320 << 20  # frames held at once by the model stage (300 frames of 640x480 fit in one chunk)
PROBE_FRAMES = 8
RSS_TARGET_MB, RSS_TARGET_LARGE_MB = 250, 300  # issue 3; issue 19 (frames larger than 640x480)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height), at least 64x64 (the renderer's minimum)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    w, h = int(match[1]), int(match[2])
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"{w}x{h}: a frame is at least 64x64")
    return w, h


def default_bundle() -> Path:
    """The trained benchmark bundle if there is one, else the demo's, else a tiny one made now."""
    for candidate in (OUT / "bundle-synth", REPO / "demo-out" / "bundle-v1"):
        if (candidate / "manifest.json").exists():
            return candidate
    from training.tiny import make_tiny_bundle

    target = OUT / "bundle-tiny"
    if not (target / "manifest.json").exists():
        make_tiny_bundle(target)
    return target


def describe_bundle(bundle: Path, size: tuple[int, int]) -> dict[str, Any]:
    """Name, version, input and tiling of a bundle, from its manifest; with the model inputs a
    ``size`` frame gives (1 for a whole-frame bundle). Exits when such a frame cannot be tiled."""
    from edge.exceptions import ImageError
    from edge.protocol import read_manifest
    from edge.tiling import grid_for

    m = read_manifest(bundle)
    inputs = 1
    if m.tiling is not None:
        try:
            inputs = grid_for(size[0], size[1], m.tiling).count
        except ImageError as exc:
            raise SystemExit(f"{bundle}: {exc}") from None
    return {
        "path": str(bundle),
        "name": m.name,
        "version": m.version,
        "input_shape": list(m.input.shape),
        "input_dtype": m.input.dtype,
        "color_mode": m.preprocessing.color_mode,
        "model_bytes": (bundle / m.model.file).stat().st_size,
        "threshold": m.threshold,
        "tiled": m.tiling is not None,
        "tiling": m.tiling.model_dump() if m.tiling is not None else None,
        "inputs_per_frame": inputs,
    }


def video_spec(size: tuple[int, int], tiled: bool) -> dict[str, Any]:
    """How the video is drawn: native frames for a tiled bundle, scaled-up parts otherwise."""
    return {"size": list(size), "native": tiled, "frames_per_part": NATIVE_FRAMES_PER_PART if tiled else 1}


def render(path: Path, frames: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Write at least ``frames`` frames of ``spec`` to ``path``; the spec with the count and time."""
    from training.synth import render_video

    t0 = time.perf_counter()
    truth = render_video(path, parts=math.ceil(frames / spec["frames_per_part"]), seed=3, fps=30,
                         size=tuple(spec["size"]), frames_per_part=spec["frames_per_part"], native=spec["native"])
    return {**spec, "frames": len(truth), "render_s": time.perf_counter() - t0}


def probe(bundle: Path, spec: dict[str, Any]) -> dict[str, float]:
    """A few frames drawn like the video's through the Classifier (LiteRT and OpenCV on 1
    thread, as the agent runs it): the median ms per frame the heavy defaults are sized by."""
    from edge.inference import Classifier
    from training.synth import render_frames

    t0 = time.perf_counter()
    frames = [f for f, _ in render_frames(parts=math.ceil(PROBE_FRAMES / spec["frames_per_part"]), seed=3,
                                          size=tuple(spec["size"]), frames_per_part=spec["frames_per_part"],
                                          native=spec["native"])][:PROBE_FRAMES]
    render_s = (time.perf_counter() - t0) / len(frames)
    default_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        clf = Classifier(bundle, num_threads=1)
        clf.predict(frames[0])  # warm-up (and the batch resize of a tiled bundle)
        times = []
        for f in frames[1:]:
            t0 = time.perf_counter()
            clf.predict(f)
            times.append(time.perf_counter() - t0)
        ms = float(np.median(times)) * 1000.0  # the median: a busy machine's stalls would halve the counts
    finally:
        cv2.setNumThreads(default_threads)
    return {"ms_per_frame": ms, "fps": 1000.0 / ms, "render_s_per_frame": render_s}


def plan_counts(args: argparse.Namespace, heavy: bool, est_fps: float | None) -> dict[str, int]:
    """Frames for the flat-out run, each paced run and each model-stage measurement.

    Light runs keep the fixed defaults; heavy ones are sized from the probe's frames/s.
    """
    if not heavy or est_fps is None:
        frames, paced, model = DEFAULT_FRAMES, DEFAULT_PACED_FRAMES, DEFAULT_MODEL_FRAMES
    else:
        pace = min(CAMERA_FPS, PACE_SHARE * est_fps)
        frames = min(DEFAULT_FRAMES, max(MIN_AGENT_FRAMES, round(FLAT_S * est_fps)))
        paced = min(DEFAULT_PACED_FRAMES, max(MIN_AGENT_FRAMES, round(PACED_S * pace)))
        model = min(DEFAULT_MODEL_FRAMES, max(MIN_MODEL_FRAMES, round(MODEL_S * est_fps)))
    frames = args.frames or frames
    paced = args.paced_frames or paced
    # the model stage reads the video's first frames: never more than the video has
    return {"frames": frames, "paced_frames": paced, "model_frames": min(model, max(frames, paced))}


def run_minutes(counts: dict[str, int], est: dict[str, float]) -> float:
    """Rough length of a heavy run: rendering, four model-stage measurements (with warm-up),
    the flat-out run and two paced runs (decoding and the fsync loops are small beside them)."""
    model = 4 * (counts["model_frames"] + min(20, max(2, counts["model_frames"] // 10)))
    pace = min(CAMERA_FPS, PACE_SHARE * est["fps"])
    seconds = (max(counts["frames"], counts["paced_frames"]) * est["render_s_per_frame"]
               + (model + counts["frames"]) / est["fps"] + 2 * counts["paced_frames"] / pace)
    return seconds / 60.0


def decode_rate(path: Path) -> dict[str, float]:
    """Frames/s and CPU ms per frame of reading the video alone."""
    cap = cv2.VideoCapture(str(path))
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return {"fps": n / (time.perf_counter() - t0), "cpu_ms_per_frame": (time.process_time() - c0) * 1000.0 / max(1, n)}


def model_rate(bundle: Path, path: Path, count: int = DEFAULT_MODEL_FRAMES, cv_threads: int | None = None) -> dict[str, Any]:
    """Preprocess + invoke alone: LiteRT with 1 thread; OpenCV with ``cv_threads`` (None: its default)."""

    default_threads = cv2.getNumThreads()
    if cv_threads is not None:
        cv2.setNumThreads(cv_threads)
    try:
        return _model_rate(bundle, path, count)
    finally:
        cv2.setNumThreads(default_threads)


def _read_chunk(cap: cv2.VideoCapture, limit: int) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    while len(frames) < limit:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    return frames


def _model_rate(bundle: Path, path: Path, count: int) -> dict[str, Any]:
    """Classifier.predict over the video's first ``count`` frames, decoded beforehand in
    chunks of at most CHUNK_BYTES; only the predict loops are timed."""
    from edge.inference import Classifier

    clf = Classifier(bundle, num_threads=1)
    cap = cv2.VideoCapture(str(path))
    frame_bytes = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) * int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) * 3
    chunk = max(1, CHUNK_BYTES // max(1, frame_bytes))
    warm = min(20, max(2, count // 10))
    invoke: list[float] = []
    total: list[float] = []
    passed = inputs = 0
    elapsed = cpu = 0.0
    while len(total) < count:
        frames = _read_chunk(cap, min(chunk, count - len(total)))
        if not frames:
            break
        if not total:
            for f in frames[:warm]:
                clf.predict(f)
        t0, c0 = time.perf_counter(), time.process_time()
        for f in frames:
            p = clf.predict(f)
            invoke.append(p.invoke_ms)
            total.append(p.invoke_ms + p.preprocess_ms)
            passed += p.passed
            inputs = len(p.tile_raws) if p.tile_raws is not None else 1
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        del frames
    cap.release()
    n = len(total)
    return {
        "frames": n,
        "fps": n / elapsed,
        "cpu_ms_per_frame": cpu * 1000.0 / max(1, n),
        "invoke_p50_ms": float(np.percentile(invoke, 50)),
        "invoke_p99_ms": float(np.percentile(invoke, 99)),
        "pre_invoke_p50_ms": float(np.percentile(total, 50)),
        "pre_invoke_p99_ms": float(np.percentile(total, 99)),
        "pass_fraction": passed / max(1, n),
        "inputs_per_frame": inputs,
        "runtime": clf.runtime,
    }


def stages(bundle: Path, video: Path, count: int) -> dict[str, Any]:
    """Decode alone, then preprocess+invoke alone as the agent runs it (LiteRT and OpenCV on
    1 thread each, the default model.threads) and with OpenCV's own pool."""
    return {
        "decode": decode_rate(video),
        "model": model_rate(bundle, video, count, cv_threads=1),
        "model_pool": model_rate(bundle, video, count),
    }


def pace_for(decode_fps: float, model_fps: float) -> tuple[float, str]:
    """The paced runs' camera rate: 30 fps, or 0.7 x the slower stage when that is below 30."""
    slower = min(decode_fps, model_fps)
    if PACE_SHARE * slower >= CAMERA_FPS:
        return CAMERA_FPS, f"{CAMERA_FPS:.0f} fps, a live camera"
    pace = round(PACE_SHARE * slower, 2)
    return pace, (f"{pace:g} fps = {PACE_SHARE} x {slower:.1f}/s (the slower of decode and preprocess+invoke on "
                  f"1 thread): a {CAMERA_FPS:.0f} fps camera is faster than the model, latency would be queueing")


def fsync_floor(folder: Path, count: int = 200, pause_s: float = 0.005) -> list[float]:
    """Milliseconds of a 4 KiB write + fdatasync, ``count`` times, in ``folder``.

    The write lands in a 1 MiB file that already exists, like a commit into a WAL that
    is reused after each checkpoint; the pause lets other writers of the disk in, as
    between the agent's commits.
    """
    path = folder / "fsync-probe.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"\0" * (1 << 20))
        os.fsync(fd)
        block = os.urandom(4096)
        out = []
        for i in range(count):
            os.pwrite(fd, block, (i % 256) * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            out.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(pause_s)
        return out
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def agent_run(
    bundle: Path, video: Path, work: Path, frames: int, fps: float | None = None, synchronous: str = "FULL",
    extra: str = "", command: list[str] | None = None,
) -> dict[str, Any]:
    """The real agent on ``video`` until ``frames`` decisions (paced at ``fps`` when given);
    ``extra`` is appended to its config (benchmarks/drift.py turns drift checks on and off);
    ``command`` replaces the ``linewatch`` executable (benchmarks/drift.py adds timers)."""
    cfg = work / "agent.toml"
    db = work / "buffer.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    pace = f"fps = {fps}\n" if fps else ""
    cfg.write_text(
        f'device_id = "bench"\n[camera]\nsource = "{video}"\n{pace}[model]\npath = "{bundle}"\n'
        f'[buffer]\npath = "{db}"\nsynchronous = "{synchronous}"\n[mqtt]\nenabled = false\n'
        "[operator]\nenabled = false\n" + extra
    )
    exe = Path(sys.executable).parent / "linewatch"
    t_start = time.perf_counter()
    log = work / "agent.log"
    with open(log, "wb") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [*(command or [str(exe)]), "edge", "run", "--config", str(cfg), "--echo"], stdout=subprocess.PIPE, stderr=err,
            text=True, bufsize=1,
        )
    assert proc.stdout is not None
    stamps: list[float] = []
    lat: list[float] = []
    record: list[float] = []
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
        d = json.loads(line)
        lat.append(d["latency_ms"])
        record.append(d["record_ms"])
        if len(stamps) == 11:
            cpu0 = _cpu_s(proc.pid)
        if len(stamps) % 50 == 0:
            rss_kb = max(rss_kb, _rss_kb(proc.pid))
    cpu1 = _cpu_s(proc.pid)
    rss_kb = max(rss_kb, _hwm_kb(proc.pid))
    proc.terminate()
    proc.wait(10)
    if len(stamps) < 20:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"the agent gave only {len(stamps)} decisions (config {cfg}); its last log lines:\n" + "\n".join(tail))
    con = sqlite3.connect(db)
    samples = con.execute("SELECT count(*) FROM samples").fetchone()[0]
    passed = con.execute("SELECT count(*) FROM results WHERE passed = 1").fetchone()[0]
    con.close()
    # skip the first 10 decisions: model warm-up and queue fill
    span = stamps[-1] - stamps[10]
    return {
        "frames": len(stamps),
        "pace_fps": fps,
        "fps": (len(stamps) - 11) / span,
        "latency_p50_ms": float(np.percentile(lat[10:], 50)),
        "latency_p99_ms": float(np.percentile(lat[10:], 99)),
        "latency_max_ms": float(np.max(lat[10:])),
        "commit_p50_ms": float(np.percentile(record[10:], 50)),
        "commit_p99_ms": float(np.percentile(record[10:], 99)),
        "cpu_ms_per_frame": (cpu1 - cpu0) * 1000.0 / (len(stamps) - 11),
        "rss_peak_mb": rss_kb / 1024,
        "first_decision_s": float(first or 0.0),
        "samples": samples,
        "passed": passed,
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    return _proc_status_kb(pid, "VmRSS:")


def _hwm_kb(pid: int) -> int:
    return _proc_status_kb(pid, "VmHWM:")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "load_avg_start": list(os.getloadavg()),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="model bundle (default: bench-out/bundle-synth if trained)")
    ap.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, metavar="WxH",
                    help="frame size of the generated video (default 640x480)")
    ap.add_argument("--frames", type=int, default=None,
                    help=f"frames for the flat-out run (default {DEFAULT_FRAMES}; about {FLAT_S:.0f} s of frames "
                         "with a tiled bundle or frames larger than 640x480)")
    ap.add_argument("--paced-frames", type=int, default=None,
                    help=f"frames for each paced run (default {DEFAULT_PACED_FRAMES}, 1 min at 30 fps; about "
                         f"{PACED_S:.0f} s of frames at the slower pace of a heavy run; a p99 over fewer rests on a "
                         "handful of frames)")
    ap.add_argument("--dir", type=Path, default=None, help="where the video and buffer go (the disk being measured)")
    args = ap.parse_args()
    for name in ("frames", "paced_frames"):
        value = getattr(args, name)
        if value is not None and value < MIN_AGENT_FRAMES // 3:
            ap.error(f"--{name.replace('_', '-')} must be at least {MIN_AGENT_FRAMES // 3} (the first 10 decisions are warm-up)")
    return args


def summarize(
    info: dict[str, Any], spec: dict[str, Any], before: dict[str, Any], after: dict[str, Any],
    agent: dict[str, Any], paced: dict[str, Any], paced_normal: dict[str, Any],
    fs_before: list[float], fs_after: list[float], pace_why: str,
) -> dict[str, Any]:
    """The JSON record: stages (mean of before and after), agent runs, ratios and targets."""
    fs = fs_before + fs_after
    decode = (before["decode"]["fps"] + after["decode"]["fps"]) / 2
    stage_cpu = (before["decode"]["cpu_ms_per_frame"] + after["decode"]["cpu_ms_per_frame"]
                 + before["model"]["cpu_ms_per_frame"] + after["model"]["cpu_ms_per_frame"]) / 2
    model_1t = (before["model"]["fps"] + after["model"]["fps"]) / 2
    model_pool = (before["model_pool"]["fps"] + after["model_pool"]["fps"]) / 2
    model_fps = max(model_1t, model_pool)
    invoke_p99 = max(before["model"]["invoke_p99_ms"], after["model"]["invoke_p99_ms"])
    slowest = min(decode, model_fps)
    rss = max(agent["rss_peak_mb"], paced["rss_peak_mb"], paced_normal["rss_peak_mb"])
    large = spec["size"][0] * spec["size"][1] > DEFAULT_SIZE[0] * DEFAULT_SIZE[1]
    rss_target = RSS_TARGET_LARGE_MB if large else RSS_TARGET_MB
    fsync = {
        "p50_ms": _pct(fs, 50),
        "p99_ms": _pct(fs, 99),
        "before_p50_p99_ms": [_pct(fs_before, 50), _pct(fs_before, 99)],
        "after_p50_p99_ms": [_pct(fs_after, 50), _pct(fs_after, 99)],
    }
    result: dict[str, Any] = {
        "frame_size": spec["size"],
        "tiled": info["tiled"],
        "inputs_per_frame": info["inputs_per_frame"],
        "video": spec,
        "decode_fps": {"before": before["decode"], "after": after["decode"], "mean": decode},
        "model": {
            "before": before["model"], "after": after["model"], "mean_fps": model_1t,
            "opencv_pool": {"before": before["model_pool"], "after": after["model_pool"], "mean_fps": model_pool},
            "reference_fps": model_fps,
        },
        "slowest_stage": "decode" if decode < model_fps else "preprocess+invoke",
        "slowest_stage_fps": slowest,
        "fsync_4k": fsync,
        "agent": agent,
        "paced": {"fps": paced["pace_fps"], "why": pace_why},
        # key names kept from the 30 fps-only script; "paced" says the rate actually used
        "agent_paced_30fps": paced,
        "agent_paced_30fps_sync_normal": paced_normal,
        "agent_vs_slowest": agent["fps"] / slowest,
        "rss_peak_mb": rss,
        # load-independent view: what the agent spends per frame beyond its two stages
        "stages_cpu_ms_per_frame": stage_cpu,
        "agent_cpu_ms_per_frame": agent["cpu_ms_per_frame"],
        "invoke_p99_ms": invoke_p99,
        "pre_invoke_p99_ms": max(before["model"]["pre_invoke_p99_ms"], after["model"]["pre_invoke_p99_ms"]),
        "latency_p99_ms": paced["latency_p99_ms"],
        "latency_target_ms": invoke_p99 + 5,
        "latency_floor_full_ms": invoke_p99 + fsync["p99_ms"],
        "load_avg_end": list(os.getloadavg()),
    }
    result["targets"] = {
        "fps_ratio>=0.8": agent["fps"] / slowest >= 0.8,
        "latency_p99<=invoke_p99+5ms": paced["latency_p99_ms"] <= invoke_p99 + 5,
        f"rss<={rss_target}MB": rss <= rss_target,
        "first_decision<=3s": agent["first_decision_s"] <= 3,
    }
    return result


def report(result: dict[str, Any]) -> str:
    """The few lines printed after the JSON."""
    info, spec, agent = result["bundle"], result["video"], result["agent"]
    paced, normal = result["agent_paced_30fps"], result["agent_paced_30fps_sync_normal"]
    model, shape, fsync = result["model"], info["input_shape"], result["fsync_4k"]
    invoke_p99, slowest = result["invoke_p99_ms"], result["slowest_stage_fps"]
    w, h = result["frame_size"]
    if info["tiled"]:
        t = info["tiling"]
        tiles = (f"tiled {t['width']}x{t['height']} at scale {t['scale']:g}, overlap {t['overlap']:g}"
                 f"{', whole view' if t['whole_frame'] else ''}: {info['inputs_per_frame']} inputs per frame")
    else:
        tiles = "whole-frame: 1 input per frame"
    rss_target = next(k for k in result["targets"] if k.startswith("rss<="))
    return (
        f"\n{info['name']} {info['version']} ({shape[1]}x{shape[2]}), {model['before']['runtime']}; "
        f"load {result['machine']['load_avg_start'][0]:.1f} -> {result['load_avg_end'][0]:.1f}\n"
        f"  frames {w}x{h} ({'native' if spec['native'] else 'scaled-up parts'}, {spec['frames']} in the video), {tiles}\n"
        f"  decode {result['decode_fps']['mean']:.1f}/s, preprocess+invoke {model['reference_fps']:.1f}/s "
        f"(OpenCV 1 thread {model['mean_fps']:.1f}/s, own pool {model['opencv_pool']['mean_fps']:.1f}/s, "
        f"{model['before']['frames']} frames each) -> slowest {slowest:.1f}/s\n"
        f"  agent flat out {agent['fps']:.1f}/s = {result['agent_vs_slowest']:.2f} x slowest (target 0.8); "
        f"{agent['samples']} samples kept, {agent['passed']}/{agent['frames']} passed\n"
        f"  CPU per frame: agent {agent['cpu_ms_per_frame']:.2f} ms, decode + preprocess + invoke alone "
        f"{result['stages_cpu_ms_per_frame']:.2f} ms\n"
        f"  paced at {result['paced']['why']}\n"
        f"  paced FULL: latency p50 {paced['latency_p50_ms']:.1f} / p99 {paced['latency_p99_ms']:.1f} ms "
        f"({paced['frames']} frames); NORMAL p50 {normal['latency_p50_ms']:.1f} / p99 {normal['latency_p99_ms']:.1f} ms\n"
        f"  target invoke p99 + 5 = {invoke_p99 + 5:.1f} ms; floor in FULL = invoke p99 {invoke_p99:.2f} + "
        f"fsync p99 {fsync['p99_ms']:.1f} = {invoke_p99 + fsync['p99_ms']:.1f} ms (fsync p50 {fsync['p50_ms']:.2f}); "
        f"preprocess+invoke p99 {result['pre_invoke_p99_ms']:.1f} ms\n"
        f"  RSS peak {result['rss_peak_mb']:.0f} MB (target {rss_target}), first decision {agent['first_decision_s']:.2f} s"
    )


def main() -> None:
    args = parse_args()
    bundle = (args.bundle or default_bundle()).resolve()  # agent configs resolve relative paths from their own folder
    info = describe_bundle(bundle, args.size)
    shape = info["input_shape"]
    w, h = args.size
    print(f"bundle {info['name']} {info['version']} at {bundle}: input {shape[1]}x{shape[2]}x{shape[3]} "
          f"{info['input_dtype']}, {'tiled' if info['tiled'] else 'whole-frame'}, {info['inputs_per_frame']} "
          f"input(s) per {w}x{h} frame", file=sys.stderr, flush=True)
    spec = video_spec(args.size, info["tiled"])
    heavy = info["tiled"] or w * h > DEFAULT_SIZE[0] * DEFAULT_SIZE[1]
    est = probe(bundle, spec) if heavy else None
    counts = plan_counts(args, heavy, est["fps"] if est else None)
    if est is not None:
        print(f"probe: {est['ms_per_frame']:.1f} ms per frame ({est['fps']:.1f}/s) -> {counts['frames']} flat-out "
              f"frames, {counts['paced_frames']} per paced run, {counts['model_frames']} per model-stage measurement; "
              f"about {run_minutes(counts, est):.1f} min in all", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"machine": machine(), "bundle": info, "probe": est, "counts": counts}
    with tempfile.TemporaryDirectory(prefix="lw-bench-pipeline-", dir=args.dir) as tmp:
        work = Path(tmp)
        video = work / "line.avi"
        spec = render(video, max(counts["frames"], counts["paced_frames"]), spec)
        print(f"video: {spec['frames']} frames of {w}x{h} in {spec['render_s']:.0f} s", file=sys.stderr, flush=True)
        before = stages(bundle, video, counts["model_frames"])
        # flat out: sustained throughput (the reader runs ahead, so latency includes queueing)
        agent = agent_run(bundle, video, work, counts["frames"])
        after = stages(bundle, video, counts["model_frames"])
        # paced like a live camera: decision latency without queueing
        pace, pace_why = pace_for((before["decode"]["fps"] + after["decode"]["fps"]) / 2,
                                  (before["model"]["fps"] + after["model"]["fps"]) / 2)
        print(f"pacing at {pace_why}", file=sys.stderr, flush=True)
        fs_before = fsync_floor(work)
        paced = agent_run(bundle, video, work, counts["paced_frames"], fps=pace)
        fs_after = fsync_floor(work)
        # the same with synchronous=NORMAL: how much of that latency is the fsync
        paced_normal = agent_run(bundle, video, work, counts["paced_frames"], fps=pace, synchronous="NORMAL")
    result.update(summarize(info, spec, before, after, agent, paced, paced_normal, fs_before, fs_after, pace_why))
    OUT.mkdir(exist_ok=True)
    (OUT / "pipeline.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(report(result), file=sys.stderr)


if __name__ == "__main__":
    main()
