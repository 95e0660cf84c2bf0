"""Benchmark the edge buffer: durable inserts per second, open-time checks, eviction cost.

    python benchmarks/buffer.py [--runs 5] [--seconds 1.5] [--dir DIR] [--check-mb 32]

Prints one JSON object on stdout and a short human summary on stderr. Runs on a
file in a temporary directory (``--dir`` picks where: the numbers are only as real
as that filesystem's fsync, so its type is reported; tmpfs makes FULL look free).

Measured:

- durable inserts/s: ``synchronous=FULL`` with one commit per result (the default),
  the same with background checkpoints (what the agent runs: no checkpoint inside a
  commit), ``NORMAL`` with one commit per result, and both with a group commit of 10
  results; median of ``--runs`` runs of ``--seconds`` each, plus the p50/p99/p99.9/max
  latency of one ``record_result``/``record_results`` call. The target is
  50 x a 600 parts/min line, i.e. >= 500 durable inserts/s in the default mode;
- ``integrity_check`` and ``quick_check`` on a buffer of ``--check-mb`` MB (why the
  buffer switches to quick_check above 64 MiB);
- the slowest ``record_result`` while that full buffer evicts (one eviction pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.buffer import Buffer, CheckpointMode, ResultRecord  # noqa: E402

TARGET_PER_S = 500  # 50 x a 600 parts/min line
# (name, synchronous, results per commit, checkpoint mode)
MODES: tuple[tuple[str, str, int, CheckpointMode], ...] = (
    ("full_single", "FULL", 1, "auto"),
    ("full_single_bg_checkpoint", "FULL", 1, "background"),  # what the agent runs
    ("normal_single", "NORMAL", 1, "auto"),
    ("full_group10", "FULL", 10, "auto"),
    ("normal_group10", "NORMAL", 10, "auto"),
)


def _record(part: int) -> ResultRecord:
    return ResultRecord(
        ts=time.time(),
        device_id="bench-cam1",
        part_id=part,
        model_version="1.0.0",
        label="ok" if part % 20 else "scratch",
        score=0.03 if part % 20 else 0.91,
        passed=part % 20 != 0,
        capture_ms=2.1,
        preprocess_ms=0.9,
        invoke_ms=0.3,
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(
    folder: Path, synchronous: str, group: int, seconds: float, checkpoint: CheckpointMode = "auto"
) -> tuple[float, list[float]]:
    """Insert for ``seconds``; (inserts per second, per-call latencies in ms)."""
    path = folder / f"run-{synchronous}-{group}-{time.monotonic_ns()}.db"
    latencies: list[float] = []
    part = 0
    with Buffer(path, synchronous=synchronous, checkpoint=checkpoint) as buf:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            if group == 1:
                buf.record_result(_record(part))
            else:
                buf.record_results([_record(part + i) for i in range(group)])
            latencies.append((time.perf_counter() - t0) * 1000.0)
            part += group
        elapsed = time.perf_counter() - start
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return part / elapsed, latencies


def insert_rates(folder: Path, runs: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, synchronous, group, checkpoint in MODES:
        rates: list[float] = []
        latencies: list[float] = []
        for _ in range(runs):
            rate, lat = one_run(folder, synchronous, group, seconds, checkpoint)
            rates.append(rate)
            latencies += lat
        out[name] = {
            "synchronous": synchronous,
            "results_per_commit": group,
            "checkpoint": checkpoint,
            "median_inserts_per_s": round(statistics.median(rates), 1),
            "runs_inserts_per_s": [round(r, 1) for r in rates],
            "call_ms_p50": round(_percentile(latencies, 0.50), 3),
            "call_ms_p99": round(_percentile(latencies, 0.99), 3),
            "call_ms_p999": round(_percentile(latencies, 0.999), 3),
            "call_ms_max": round(max(latencies), 3),
        }
    return out


def checks_and_eviction(folder: Path, megabytes: int) -> dict[str, Any]:
    """Fill a buffer to ``megabytes``, time the open-time checks, then one eviction pass."""
    path = folder / "full.db"
    budget = megabytes * 1_000_000
    part = 0
    with Buffer(path, max_bytes=budget, synchronous="NORMAL") as buf:
        while buf.counters()["eviction_passes"] == 0:
            buf.record_results([_record(part + i) for i in range(500)])
            part += 500
    rows = part
    conn = sqlite3.connect(path)
    timings: dict[str, float] = {}
    for pragma in ("integrity_check", "quick_check"):
        t0 = time.perf_counter()
        assert conn.execute(f"PRAGMA {pragma}").fetchone()[0] == "ok"
        timings[pragma] = round(time.perf_counter() - t0, 3)
    conn.close()
    worst = 0.0
    normal: list[float] = []
    with Buffer(path, max_bytes=budget, integrity_check="off") as buf:
        passes = buf.counters()["eviction_passes"]
        while buf.counters()["eviction_passes"] == passes:
            t0 = time.perf_counter()
            buf.record_result(_record(part))
            ms = (time.perf_counter() - t0) * 1000.0
            part += 1
            if buf.counters()["eviction_passes"] == passes:
                normal.append(ms)
            else:
                worst = ms
        evicted = buf.counters()
    return {
        "buffer_bytes": budget,
        "rows_to_fill": rows,
        "integrity_check_s": timings["integrity_check"],
        "quick_check_s": timings["quick_check"],
        "eviction_record_ms": round(worst, 1),
        "ordinary_record_ms_p50": round(_percentile(normal, 0.5), 3) if normal else None,
        "evicted_in_that_pass": evicted["evicted_unsynced_pass"],
    }


def filesystem_of(folder: Path) -> str:
    """The filesystem type holding ``folder`` (from /proc/mounts; 'unknown' elsewhere)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if str(folder).startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, fields[2]
    except OSError:
        pass
    return fstype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per mode; the median is reported")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of one run")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary buffer files go")
    parser.add_argument("--check-mb", type=int, default=32, help="size of the buffer for the check/eviction timings (0 skips)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lw-bench-buffer-", dir=args.dir) as tmp:
        folder = Path(tmp).resolve()
        report: dict[str, Any] = {
            "benchmark": "edge.buffer",
            "sqlite_version": sqlite3.sqlite_version,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "filesystem": filesystem_of(folder),
            "runs": args.runs,
            "seconds_per_run": args.seconds,
            "target_durable_inserts_per_s": TARGET_PER_S,
            "modes": insert_rates(folder, args.runs, args.seconds),
        }
        if args.check_mb > 0:
            report["full_buffer"] = checks_and_eviction(folder, args.check_mb)
    default = report["modes"]["full_single"]["median_inserts_per_s"]
    report["meets_target"] = default >= TARGET_PER_S
    print(json.dumps(report, indent=2))

    lines = [f"edge buffer on {report['filesystem']} (SQLite {report['sqlite_version']}), median of {args.runs} runs:"]
    for name, m in report["modes"].items():
        lines.append(
            f"  {name:<26} {m['median_inserts_per_s']:>9.0f} inserts/s   call p50 {m['call_ms_p50']:.3f} ms"
            f"  p99 {m['call_ms_p99']:.3f}  p99.9 {m['call_ms_p999']:.3f}  max {m['call_ms_max']:.1f} ms"
        )
    verdict = "meets" if report["meets_target"] else "MISSES"
    lines.append(f"  default (FULL, one commit per result) {verdict} the target of >= {TARGET_PER_S} durable inserts/s")
    if "full_buffer" in report:
        fb = report["full_buffer"]
        lines.append(
            f"  {fb['buffer_bytes'] / 1e6:.0f} MB buffer: integrity_check {fb['integrity_check_s']} s,"
            f" quick_check {fb['quick_check_s']} s; the record_result that evicted took {fb['eviction_record_ms']} ms"
        )
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
