"""Benchmark: drain a 100,000-result backlog through Mosquitto into the cloud store, acked.

    .venv/bin/python benchmarks/sync.py [--rows 100000] [--naive-rows 2000] [--batch-rows 500] [--max-inflight 8]

Starts its own Mosquitto on a free loopback port and one ingest worker
(``linewatch cloud serve``, a real process), fills a fresh buffer with ``--rows`` results,
then times edge.sync.SyncClient from start until every row is acked by the cloud (marked
synced in the buffer). For comparison, in the same run and against the same broker, a
naive loop publishes one row per QoS-1 message and waits for each PUBACK (no cloud
storage, no app-level ack: the naive figure is flattering to the naive loop; median of
three runs). The broker runs with ``set_tcp_nodelay true`` (see docs/sync.md).

Prints one JSON object and writes it to bench-out/sync.json.
Targets: >= 5,000 results/s and >= 10x the naive rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge.buffer import Buffer, ResultRecord  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.sync import SyncClient  # noqa: E402

TARGET_RATE = 5_000
TARGET_SPEEDUP = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        sys.exit("mosquitto is not installed: sudo apt-get install -y mosquitto")
    return found


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"mosquitto did not listen on {port}")


def naive_rate(port: int, rows: list[dict[str, Any]]) -> float:
    """One row per message, QoS 1, wait for each PUBACK: rows per second."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="naive", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        t0 = time.perf_counter()
        for row in rows:
            c.publish("bench/naive/devices/naive/result", json.dumps(row), qos=1).wait_for_publish(10)
        return len(rows) / (time.perf_counter() - t0)
    finally:
        c.loop_stop()
        c.disconnect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--naive-rows", type=int, default=2_000)
    ap.add_argument("--batch-rows", type=int, default=500)
    ap.add_argument("--max-inflight", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "sync.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lw-bench-sync-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
    )
    broker = subprocess.Popen([mosquitto(), "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ingest: subprocess.Popen[bytes] | None = None
    try:
        wait_port(port)
        (work / "cloud.toml").write_text(f'[mqtt]\nport = {port}\ntopic_prefix = "bench"\n')
        (work / "agent.toml").write_text(
            f'device_id = "bench-1"\ncamera.source = "none.mp4"\nmodel.path = "models"\nbuffer.path = "buffer.db"\n'
            f'buffer.max_bytes = 500_000_000\n[mqtt]\nport = {port}\ntopic_prefix = "bench"\n'
            f"batch_rows = {args.batch_rows}\nmax_inflight = {args.max_inflight}\n"
        )
        config = load_config(work / "agent.toml")
        t_fill = time.perf_counter()
        now = time.time()
        with Buffer(config.buffer.path, max_bytes=config.buffer.max_bytes, device_id=config.device_id) as buf:
            for start in range(0, args.rows, 5_000):
                buf.record_results(
                    ResultRecord(now + i * 1e-3, config.device_id, i, "1.0.0", "ok" if i % 7 else "scratch",
                                 0.1234 if i % 7 else 0.8765, bool(i % 7), 1.21, 0.43, 0.27)  # fmt: skip
                    for i in range(start, min(args.rows, start + 5_000))
                )
            sample_rows = buf.pending("results", limit=args.naive_rows)
        fill_s = time.perf_counter() - t_fill

        log = open(work / "ingest.log", "wb")  # noqa: SIM115 - lives as long as the process
        ingest = subprocess.Popen(
            [str(Path(sys.executable).parent / "linewatch"), "cloud", "serve", "--config", str(work / "cloud.toml")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while b"connected to" not in (work / "ingest.log").read_bytes():
            if time.monotonic() > deadline or ingest.poll() is not None:
                sys.exit(f"ingest did not start: {(work / 'ingest.log').read_text()}")
            time.sleep(0.05)
        time.sleep(0.3)  # its SUBACKs

        # The machine may be shared: take the median of three naive runs.
        naive_runs = sorted(naive_rate(port, sample_rows) for _ in range(3))
        naive = naive_runs[1]

        client = SyncClient(config)
        t0 = time.perf_counter()
        client.start()
        while client.stats.rows_acked["results"] < args.rows:
            if time.perf_counter() - t0 > 600:
                sys.exit("drain did not finish in 10 minutes")
            time.sleep(0.005)
        # stop() marks the last acked rows synced (and says offline): part of the time.
        client.stop()
        client.join(3)
        drain_s = time.perf_counter() - t0
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(10)
        log.close()

        with Buffer.open_readonly(config.buffer.path) as buf:
            left = buf.unsynced_counts()["results"]
        with sqlite3.connect(work / "cloud.db") as conn:
            stored, distinct = conn.execute("SELECT count(*), count(DISTINCT seq) FROM results WHERE device_id = 'bench-1'").fetchone()
        rate = args.rows / drain_s
        result = {
            "benchmark": "sync",
            "rows": args.rows,
            "drain_s": round(drain_s, 3),
            "results_per_s": round(rate),
            "naive_rows": len(sample_rows),
            "naive_results_per_s": round(naive),
            "naive_runs_per_s": [round(r) for r in naive_runs],
            "speedup_vs_naive": round(rate / naive, 1),
            "batch_rows": args.batch_rows,
            "max_inflight": args.max_inflight,
            "batches_sent": client.stats.batches_sent,
            "resends": client.stats.resends,
            "cloud_rows": stored,
            "cloud_distinct_seqs": distinct,
            "buffer_unsynced_after": left,
            "fill_s": round(fill_s, 2),
            "synchronous": {"buffer": config.buffer.synchronous, "cloud": "FULL"},
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "targets": {"results_per_s": TARGET_RATE, "speedup_vs_naive": TARGET_SPEEDUP},
        }
        result["ok"] = bool(
            rate >= TARGET_RATE and rate / naive >= TARGET_SPEEDUP and stored == distinct == args.rows and left == 0
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0 if result["ok"] else 1
    finally:
        if ingest is not None and ingest.poll() is None:
            ingest.kill()
            ingest.wait(5)
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
