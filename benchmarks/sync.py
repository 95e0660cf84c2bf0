"""Benchmark the outbox: drain rate, and the agent's decision latency while it drains.

    .venv/bin/python benchmarks/sync.py [--only drain|latency] [--rows 100000] [--pairs 4] [...]

Both parts run by default; the result (one JSON object) is printed and written to
bench-out/sync.json. Each part starts its own Mosquitto (``set_tcp_nodelay true``) on a
free loopback port and one real ingest worker (``linewatch cloud serve``).

**drain**: fills a fresh buffer with ``--rows`` results, then times edge.sync.SyncClient
from start until every row is acked by the cloud (marked synced in the buffer). For
comparison, in the same run and against the same broker, a naive loop publishes one row
per QoS-1 message and waits for each PUBACK (no cloud storage, no app-level ack: the naive
figure is flattering to the naive loop; median of three runs).
Targets: >= 5,000 results/s and >= 10x the naive rate.

**latency** (issue 4: "while draining a 100,000-result backlog, the agent's decision
latency p99 rises by <= 10%"): the real agent (``linewatch edge run --echo``, durable FULL
commits, MQTT on) inspects a rendered 640x480 video paced at ``--fps`` like a live camera
(``camera.live = true``: a frame inspection cannot take in time is dropped, and counted,
never queued), with the bundle benchmarks/pipeline.py picks. Its buffer is pre-filled with ``--rows``
results, either already synced ("idle": nothing to drain) or unsynced ("drain"). The
broker refuses the device (unknown user) until the agent has made ``--warmup`` decisions;
then the user is added and the broker reloaded, so the link comes up in steady state, as
after a network outage. A watcher client sees the device's first online status (connect)
and the cloud's acks (the backlog shrinking). Per pair, both runs are cut to the same
window: from connect for as long as the drain run took to get its backlog acked. The
pairs alternate their order (drain first, then idle first, ...); reported: the median of
the per-run p99s of each kind, their ratio, and the pooled p99s.
Target: median drain p99 / median idle p99 <= 1.10.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge.buffer import Buffer, ResultRecord  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.sync import SyncClient  # noqa: E402

TARGET_RATE = 5_000
TARGET_SPEEDUP = 10.0
TARGET_P99_RATIO = 1.10
PREFIX = "bench"
LINEWATCH = str(Path(sys.executable).parent / "linewatch")


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


def fill(path: Path, device_id: str, rows: int, *, synced: bool = False) -> None:
    """A buffer holding ``rows`` results (marked synced if ``synced``)."""
    now = time.time() - rows * 1e-3
    with Buffer(path, max_bytes=500_000_000, device_id=device_id) as buf:
        for start in range(0, rows, 5_000):
            buf.record_results(
                ResultRecord(now + i * 1e-3, device_id, i, "1.0.0", "ok" if i % 7 else "scratch",
                             0.1234 if i % 7 else 0.8765, bool(i % 7), 1.21, 0.43, 0.27)  # fmt: skip
                for i in range(start, min(rows, start + 5_000))
            )
        if synced:
            buf.mark_synced("results", range(1, rows + 1))


def start_ingest(work: Path, port: int, store: Path | None = None) -> tuple[subprocess.Popen[bytes], Any]:
    store_toml = "" if store is None else f'[store]\npath = "{store}"\n'
    (work / "cloud.toml").write_text(f'[mqtt]\nport = {port}\ntopic_prefix = "{PREFIX}"\n{store_toml}')
    log = open(work / "ingest.log", "wb")  # noqa: SIM115 - lives as long as the process
    ingest = subprocess.Popen([LINEWATCH, "cloud", "serve", "--config", str(work / "cloud.toml")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while b"connected to" not in (work / "ingest.log").read_bytes():
        if time.monotonic() > deadline or ingest.poll() is not None:
            sys.exit(f"ingest did not start: {(work / 'ingest.log').read_text()}")
        time.sleep(0.05)
    time.sleep(0.3)  # its SUBACKs
    return ingest, log


def stop_proc(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}


# -- drain rate ------------------------------------------------------------------------------


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


def drain_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The drain part: SyncClient alone, 100,000 results, against a naive loop."""
    work = Path(tempfile.mkdtemp(prefix="lw-bench-sync-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
    )
    broker = subprocess.Popen([mosquitto(), "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ingest: subprocess.Popen[bytes] | None = None
    try:
        wait_port(port)
        (work / "agent.toml").write_text(
            f'device_id = "bench-1"\ncamera.source = "none.mp4"\nmodel.path = "models"\nbuffer.path = "buffer.db"\n'
            f'buffer.max_bytes = 500_000_000\n[mqtt]\nport = {port}\ntopic_prefix = "{PREFIX}"\n'
            f"batch_rows = {args.batch_rows}\nmax_inflight = {args.max_inflight}\n"
        )
        config = load_config(work / "agent.toml")
        t_fill = time.perf_counter()
        fill(config.buffer.path, config.device_id, args.rows)
        fill_s = time.perf_counter() - t_fill
        with Buffer.open_readonly(config.buffer.path) as buf:
            sample_rows = buf.pending("results", limit=args.naive_rows)

        ingest, log = start_ingest(work, port)

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
        stop_proc(ingest)
        log.close()

        with Buffer.open_readonly(config.buffer.path) as buf:
            left = buf.unsynced_counts()["results"]
        with sqlite3.connect(work / "cloud.db") as conn:
            stored, distinct = conn.execute("SELECT count(*), count(DISTINCT seq) FROM results WHERE device_id = 'bench-1'").fetchone()
        rate = args.rows / drain_s
        result: dict[str, Any] = {
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
            "targets": {"results_per_s": TARGET_RATE, "speedup_vs_naive": TARGET_SPEEDUP},
        }
        result["ok"] = bool(
            rate >= TARGET_RATE and rate / naive >= TARGET_SPEEDUP and stored == distinct == args.rows and left == 0
        )
        return result
    finally:
        if ingest is not None and ingest.poll() is None:
            ingest.kill()
            ingest.wait(5)
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(work, ignore_errors=True)


# -- decision latency while draining -----------------------------------------------------------


class GatedBroker:
    """Mosquitto that refuses a device (unknown user) until :meth:`allow` adds it and reloads.

    Anonymous clients (ingest, the watcher) are always let in.
    """

    PASSWORD = "bench-pw"

    def __init__(self, work: Path) -> None:
        passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if not Path(passwd).exists():
            sys.exit("mosquitto_passwd is not installed (it comes with mosquitto): sudo apt-get install -y mosquitto")
        self.passwd = passwd
        self.port = free_port()
        # Started as root, Mosquitto reads the password file as user "mosquitto" (also on reload).
        work.chmod(0o755)
        self.users = work / "passwd"
        self.users.write_text("")
        self._passwd("nobody")  # a password file with no device in it: every device is refused
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npassword_file {self.users}\npersistence false\n"
            "max_queued_messages 100000\nset_tcp_nodelay true\n"
        )
        self.proc = subprocess.Popen([mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def _passwd(self, user: str) -> None:
        subprocess.run([self.passwd, "-b", str(self.users), user, self.PASSWORD], check=True, capture_output=True)

    def allow(self, user: str) -> None:
        """Add ``user`` and make the broker re-read its password file (SIGHUP)."""
        self._passwd(user)
        self.proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@dataclass
class DeviceSeen:
    online_at: float | None = None
    statuses: list[tuple[float, int | None]] = field(default_factory=list)  # (monotonic, unsynced)
    acks: list[tuple[float, list[tuple[int, int]]]] = field(default_factory=list)  # (monotonic, results ranges)


class Watcher:
    """An MQTT client that records every device's statuses and the cloud's acks, with times."""

    def __init__(self, port: int) -> None:
        self.devices: dict[str, DeviceSeen] = {}
        self.lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-watcher", protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.subscribe([(f"{PREFIX}/devices/+/status", 0), (f"{PREFIX}/devices/+/ack", 0)])
        c.loop_start()
        self.client = c

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        device, kind = parts[-2], parts[-1]
        body = json.loads(msg.payload)
        with self.lock:
            seen = self.devices.setdefault(device, DeviceSeen())
            if kind == "status":
                seen.statuses.append((now, body.get("unsynced")))
                if body.get("state") == "online" and seen.online_at is None:
                    seen.online_at = now
            elif kind == "ack":
                ranges = [(int(a), int(b)) for a, b in body.get("acked", {}).get("results", [])]
                if ranges:
                    seen.acks.append((now, ranges))

    def seen(self, device: str) -> DeviceSeen:
        """What was seen of ``device`` so far (copies of the lists)."""
        with self.lock:
            s = self.devices.setdefault(device, DeviceSeen())
            return DeviceSeen(s.online_at, list(s.statuses), list(s.acks))

    def acked_upto(self, device: str, last: int) -> tuple[int, float | None]:
        """How many of seqs 1..last the cloud acked, and when the last of them was acked."""
        covered: list[tuple[int, int]] = []
        done_at = None
        acks = list(self.seen(device).acks)
        for t, ranges in acks:
            covered = merge(covered + [(max(1, a), min(b, last)) for a, b in ranges if a <= last])
            if done_at is None and sum(b - a + 1 for a, b in covered) >= last:
                done_at = t
        return sum(b - a + 1 for a, b in covered), done_at

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class Run:
    kind: str  # "idle" or "drain"
    device: str
    decisions: list[tuple[float, float, float]]  # (monotonic when read, latency_ms, record_ms)
    connected_at: float
    drained_at: float | None
    unsynced_after: int
    dropped: int  # frames the camera dropped over the whole run (-1: unknown)
    statuses: list[tuple[float, int | None]]
    acks: list[tuple[float, int]]  # (s after connect, results acked so far of the backlog)

    def window(self, start: float, length: float) -> np.ndarray:
        t0 = self.connected_at + start
        return np.array([[lat, rec] for t, lat, rec in self.decisions if t0 <= t <= t0 + length]).reshape(-1, 2)


def agent_run(kind: str, index: int, ctx: dict[str, Any], args: argparse.Namespace, span: float) -> Run:
    """One agent process over a pre-filled buffer; the link opens after the warm-up."""
    broker: GatedBroker = ctx["broker"]
    watcher: Watcher = ctx["watcher"]
    device = f"lat-{kind}-{index}"
    run_dir = ctx["work"] / device
    run_dir.mkdir()
    fill(run_dir / "buffer.db", device, args.rows, synced=kind == "idle")
    cfg = run_dir / "agent.toml"
    cfg.write_text(
        f'device_id = "{device}"\n[camera]\nsource = "{ctx["video"]}"\nfps = {args.fps}\nloop = true\nlive = true\n'
        f'[model]\npath = "{ctx["bundle"]}"\n[buffer]\npath = "{run_dir / "buffer.db"}"\nmax_bytes = 500_000_000\n'
        f'[operator]\nenabled = false\n[mqtt]\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\nusername = "{device}"\n'
    )
    env = {**os.environ, "LINEWATCH_MQTT_PASSWORD": GatedBroker.PASSWORD}
    with open(run_dir / "agent.log", "wb") as log:
        proc = subprocess.Popen([LINEWATCH, "edge", "run", "--config", str(cfg), "--echo"], stdout=subprocess.PIPE,
                                stderr=log, text=True, bufsize=1, env=env)  # fmt: skip
    if args.pin:
        pin(proc.pid, AGENT_CPU)
    decisions: list[tuple[float, float, float]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic()
            d = json.loads(line)
            decisions.append((now, float(d["latency_ms"]), float(d["record_ms"])))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while len(decisions) < args.warmup:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"agent made {len(decisions)} decisions: {(run_dir / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.05)
        broker.allow(device)
        deadline = time.monotonic() + 30  # the agent retries with backoff (at most ~4 s here)
        while (connected := watcher.seen(device).online_at) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"agent did not connect: {(run_dir / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.02)
        drained = None
        if kind == "drain":
            deadline = time.monotonic() + 600
            while (drained := watcher.acked_upto(device, args.rows)[1]) is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"backlog not drained: {(run_dir / 'agent.log').read_text()[-2000:]}")
                time.sleep(0.05)
            time.sleep(0.5)
        else:
            time.sleep(max(0.0, connected + span - time.monotonic()))
    finally:
        stop_proc(proc)
        reader.join(5)
    with Buffer.open_readonly(run_dir / "buffer.db") as buf:
        left = buf.unsynced_counts()["results"]
    try:  # the agent's last status file: frames a live camera dropped because inspection fell behind
        dropped = int(json.loads((run_dir / "buffer.status.json").read_text())["camera"]["dropped"])
    except (OSError, ValueError, KeyError, TypeError):
        dropped = -1
    seen = watcher.seen(device)
    acks = []
    total: list[tuple[int, int]] = []
    for t, ranges in seen.acks:
        total = merge(total + [(a, min(b, args.rows)) for a, b in ranges if a <= args.rows])
        acks.append((round(t - connected, 3), sum(b - a + 1 for a, b in total)))
    run = Run(kind, device, decisions, connected, drained, left, dropped,
              [(round(t - connected, 3), u) for t, u in seen.statuses], acks)  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)
    return run


def pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if len(values) else float("nan")


AGENT_CPU, CLOUD_CPU = 1, 0


def pin(pid: int, cpu: int) -> None:
    """Pin a process (all its threads) to one CPU, when the machine has it."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        for tid in os.listdir(f"/proc/{pid}/task") if Path(f"/proc/{pid}/task").is_dir() else [str(pid)]:
            with contextlib.suppress(OSError):  # a thread may have exited meanwhile
                os.sched_setaffinity(int(tid), {cpu})


def latency_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """The latency part: pairs of agent runs, idle vs draining, in alternating order."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline import default_bundle, render  # the pipeline benchmark's bundle and video

    bundle = args.bundle or default_bundle()
    work = Path(tempfile.mkdtemp(prefix="lw-bench-synclat-"))
    broker = GatedBroker(work)
    ingest: subprocess.Popen[bytes] | None = None
    watcher: Watcher | None = None
    load_before = os.getloadavg()
    store: Path | None = None
    try:
        video = work / "line.avi"
        render(video, 900)  # 30 s at 30 fps; the agent loops it
        if args.cloud_elsewhere:
            # In a plant the broker and the cloud are other machines: here they get the CPU only
            # when the edge side leaves it, and the store's fsyncs go to RAM, not the agent's disk.
            shm = Path("/dev/shm")
            store = Path(tempfile.mkdtemp(prefix="lw-cloud-", dir=shm if shm.is_dir() else None)) / "cloud.db"
        ingest, log = start_ingest(work, broker.port, store)
        if args.cloud_elsewhere:
            for pid in (ingest.pid, broker.proc.pid):
                os.setpriority(os.PRIO_PROCESS, pid, 19)  # every thread started later inherits it
        if args.pin:  # the cloud side runs on another machine in a plant: keep it off the agent's core
            pin(ingest.pid, CLOUD_CPU)
            pin(broker.proc.pid, CLOUD_CPU)
        watcher = Watcher(broker.port)
        ctx = {"broker": broker, "watcher": watcher, "work": work, "video": video, "bundle": bundle}
        pairs = []
        span = args.idle_span
        for i in range(args.pairs):
            order = ("drain", "idle") if i % 2 == 0 else ("idle", "drain")
            runs: dict[str, Run] = {}
            for kind in order:
                if kind == "idle" and "drain" in runs and runs["drain"].drained_at is not None:
                    # Idle after its pair's drain: cover exactly as long as that drain took.
                    span = max(span, runs["drain"].drained_at - runs["drain"].connected_at + 1.0)
                runs[kind] = agent_run(kind, i, ctx, args, span)
                print(f"pair {i + 1}/{args.pairs}: {kind} run done", file=sys.stderr, flush=True)
            d, idle = runs["drain"], runs["idle"]
            assert d.drained_at is not None
            length = min(d.drained_at - d.connected_at, span)
            span = max(span, 1.5 * (d.drained_at - d.connected_at) + 1.0)  # an idle run first covers the next drain
            wd, wi = d.window(0.0, length), idle.window(0.0, length)
            acked_in_window = [n for t, n in d.acks if t <= length + 0.01]
            pairs.append(
                {
                    "order": list(order),
                    "window_s": round(length, 2),
                    "drain_s": round(d.drained_at - d.connected_at, 2),
                    "backlog_results_per_s": round(args.rows / (d.drained_at - d.connected_at)),
                    "decisions": {"drain": len(wd), "idle": len(wi)},
                    "drain": {"p50_ms": pct(wd[:, 0], 50), "p99_ms": pct(wd[:, 0], 99), "max_ms": pct(wd[:, 0], 100),
                              "record_p99_ms": pct(wd[:, 1], 99)},
                    "idle": {"p50_ms": pct(wi[:, 0], 50), "p99_ms": pct(wi[:, 0], 99), "max_ms": pct(wi[:, 0], 100),
                             "record_p99_ms": pct(wi[:, 1], 99)},
                    "p99_ratio": round(pct(wd[:, 0], 99) / pct(wi[:, 0], 99), 3),
                    # The backlog shrinking during the window: statuses (unsynced) and acks.
                    "drain_unsynced_statuses": d.statuses,
                    "backlog_acked_in_window": acked_in_window[-1] if acked_in_window else 0,
                    "acks_in_window": len(acked_in_window),
                    "unsynced_after": {"drain": d.unsynced_after, "idle": idle.unsynced_after},
                    "frames_dropped": {"drain": d.dropped, "idle": idle.dropped},
                    "_windows": (wd, wi),
                }  # fmt: skip
            )
            print(f"pair {i + 1}: p99 drain {pairs[-1]['drain']['p99_ms']} ms, idle {pairs[-1]['idle']['p99_ms']} ms "
                  f"over {length:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        stop_proc(ingest)
        log.close()
    finally:
        if watcher is not None:
            watcher.close()
        if ingest is not None and ingest.poll() is None:
            ingest.kill()
            ingest.wait(5)
        broker.close()
        shutil.rmtree(work, ignore_errors=True)
        if store is not None:
            shutil.rmtree(store.parent, ignore_errors=True)
    med_d = float(np.median([p["drain"]["p99_ms"] for p in pairs]))
    med_i = float(np.median([p["idle"]["p99_ms"] for p in pairs]))
    pooled_d = np.concatenate([p["_windows"][0] for p in pairs])
    pooled_i = np.concatenate([p["_windows"][1] for p in pairs])
    for p in pairs:
        del p["_windows"]
    ratio = med_d / med_i
    return {
        "bundle": str(bundle),
        "backlog": args.rows,
        "fps": args.fps,
        "pairs": pairs,
        "median_p99_ms": {"drain": round(med_d, 2), "idle": round(med_i, 2)},
        "median_p99_ratio": round(ratio, 3),
        "pooled": {
            "decisions": {"drain": len(pooled_d), "idle": len(pooled_i)},
            "drain": {"p50_ms": pct(pooled_d[:, 0], 50), "p99_ms": pct(pooled_d[:, 0], 99)},
            "idle": {"p50_ms": pct(pooled_i[:, 0], 50), "p99_ms": pct(pooled_i[:, 0], 99)},
            "p99_ratio": round(pct(pooled_d[:, 0], 99) / pct(pooled_i[:, 0], 99), 3),
        },
        "pinned": bool(args.pin),
        "cloud_elsewhere": bool(args.cloud_elsewhere),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "target": {"p99_ratio": TARGET_P99_RATIO},
        "ok": bool(ratio <= TARGET_P99_RATIO and all(p["unsynced_after"]["drain"] == 0 for p in pairs)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("drain", "latency"), help="run one part (default: both)")
    ap.add_argument("--rows", type=int, default=100_000, help="backlog size, in results")
    ap.add_argument("--naive-rows", type=int, default=2_000)
    ap.add_argument("--batch-rows", type=int, default=500)
    ap.add_argument("--max-inflight", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=4, help="latency: idle/drain run pairs, order alternating")
    ap.add_argument("--fps", type=float, default=30.0, help="latency: camera pace")
    ap.add_argument("--warmup", type=int, default=60, help="latency: decisions before the link may come up")
    ap.add_argument("--idle-span", type=float, default=10.0, help="latency: s an idle run lasts after connect (at least)")
    ap.add_argument("--bundle", type=Path, default=None, help="latency: model bundle (default: the pipeline benchmark's)")
    ap.add_argument("--pin", action="store_true",
                    help="latency: pin the agent to CPU 1 and Mosquitto + cloud serve to CPU 0 (in a plant they run elsewhere)")
    ap.add_argument("--cloud-elsewhere", action="store_true",
                    help="latency: run Mosquitto + cloud serve at nice 19 with the cloud store in /dev/shm, "
                    "so the figure is the agent's own drain cost (in a plant they are other machines)")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out" / "sync.json")
    args = ap.parse_args()
    if args.pairs < 1 or args.rows < 1:
        ap.error("--pairs and --rows must be at least 1")

    result: dict[str, Any] = {"benchmark": "sync", **machine()}
    if args.only in (None, "drain"):
        drain = drain_benchmark(args)
        result.update(drain)  # top level, as before: docs and scripts read these keys
        print(f"drain: {drain['results_per_s']} results/s, {drain['speedup_vs_naive']}x naive", file=sys.stderr, flush=True)
    if args.only in (None, "latency"):
        result["latency_while_draining"] = latency_benchmark(args)
    result["ok"] = all(part.get("ok", True) for part in (result, result.get("latency_while_draining", {})))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
