"""Benchmark over-the-air delivery on a real Mosquitto with real bundles.

    python benchmarks/ota.py [--bundle DIR] [--devices 20] [--pad-mb 4] [--pairs 5] [--seconds 3]
    python benchmarks/ota.py --only inference --pairs 5      # one part: wire, cuts, inference, fleet

Prints one JSON object on stdout (also written to bench-out/ota.json) and a summary on
stderr. The bundle is the trained benchmark bundle if there is one (bench-out/bundle-synth,
demo-out/bundle-v1), else a tiny one made now; a copy of it under another version is the
model every device starts with. ``--pad-mb`` adds that many MB of random bytes to the
report folder of a second bundle, to see a model of realistic size on the wire.

Measured:

- wire bytes / bundle bytes for one device (target <= 1.05): every MQTT payload and topic
  the device received or sent for the update (chunks, requests, desired, states), over the
  packed bundle size; MQTT fixed headers (2-5 bytes per packet) are not counted;
- chunks sent twice after a cut (target <= 1): the cut comes when 40% of a rate-limited
  transfer is in: the link (a TCP proxy drops it for 2 s), the device process (stopped and
  started again), the broker without persistence (kill -9, sessions lost), and the broker
  with persistence as in firmware-config/mosquitto.conf (a restart: SIGTERM, the session
  and its queued chunks are saved and restored). Counted at the server: chunks it sent more
  than once; and at the device: chunks it received more than once;
- inference p99 while a device downloads vs idle (target <= 1.1x): a device process (the
  OTA client and one thread deciding a 640x480 frame in a loop, ~300 parts/s) alternates
  ``--pairs`` idle windows and download windows of ``--seconds`` each; p99 per window,
  the median of each kind, and their ratio. The device process is pinned to one core and
  this process and the broker (the cloud side) to the others, so the download window
  costs only what the device itself does (``--no-pin`` to let them share);
- 20 devices from one push: wall time from ``run_push`` to every device active, and bytes
  the cloud sent.

Record the machine's load next to the figures (``uptime``): the report includes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cloud.config import CloudConfig, parse_cloud_config  # noqa: E402
from cloud.ota_server import OtaServer  # noqa: E402
from cloud.registry import RegisteredModel, Registry, init_keys, open_ota_store, public_key_path  # noqa: E402
from cloud.rollout import run_push  # noqa: E402
from cloud.store import open_store  # noqa: E402
from edge.config import AgentConfig, parse_config  # noqa: E402
from edge.inference import Classifier  # noqa: E402
from edge.install import install_bundle  # noqa: E402
from edge.models import ModelStore  # noqa: E402
from edge.ota import OtaClient  # noqa: E402
from edge.protocol import MANIFEST_FILE, StatusPayload  # noqa: E402

OUT = REPO / "bench-out"
PARTS = ("wire", "cuts", "inference", "fleet")


def default_bundle() -> Path:
    for candidate in (OUT / "bundle-synth", REPO / "demo-out" / "bundle-v1", OUT / "bundle-tiny"):
        if (candidate / MANIFEST_FILE).exists():
            return candidate
    from training.tiny import make_tiny_bundle

    target = OUT / "bundle-tiny"
    OUT.mkdir(exist_ok=True)
    make_tiny_bundle(target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, Any]:
    """CPU model, cores and load now (the figures mean little without them)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "load": list(os.getloadavg()), "uptime": uptime}


class Mosquitto:
    """A broker on a free loopback port; ``persistent`` as the site template (persistence true)."""

    def __init__(self, work: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.dir = work / f"broker-{self.port}"
        self.dir.mkdir(parents=True)
        if persistent:
            # Started as root, mosquitto drops to the `mosquitto` user: it must reach and write
            # this folder to save its db (the temporary work folder is 0700).
            self.dir.chmod(0o777)
            work.chmod(work.stat().st_mode | 0o011)
        self.conf = self.dir / "mosquitto.conf"
        persistence = f"persistence true\npersistence_location {self.dir}/\n" if persistent else "persistence false\n"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persistence}max_queued_messages 100000\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        """kill -9: a crash (nothing saved)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def terminate(self) -> None:
        """SIGTERM, as `systemctl restart mosquitto` does: a persistent broker saves its state."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None


class CutProxy:
    """A TCP forwarder between a device and the broker that can cut the link, as a plant
    network does: every open connection is dropped and new ones refused for a while."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.down_until = 0.0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s_ in (src, dst):
                with contextlib.suppress(OSError):
                    s_.shutdown(socket.SHUT_RDWR)
                s_.close()

    def cut(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self.cut(0)


def variant(src: Path, dest: Path, version: str, pad_bytes: int = 0) -> Path:
    shutil.copytree(src, dest)
    (dest / "signature.json").unlink(missing_ok=True)
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    raw["version"] = version
    (dest / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))
    if pad_bytes:
        (dest / "report").mkdir(exist_ok=True)
        (dest / "report" / "padding.bin").write_bytes(os.urandom(pad_bytes))
    return dest


class Bench:
    def __init__(self, work: Path, bundle: Path, pad_mb: float) -> None:
        self.work = work
        self.bundle = bundle
        self.pad_bytes = int(pad_mb * 1_000_000)
        self.broker = Mosquitto(work)
        self.broker.start()
        self.cfg: CloudConfig = self.cloud_config(self.broker.port)
        init_keys(self.cfg)
        self.base_dir = variant(bundle, work / "b-base", "bench-base")
        self.target_dir = variant(bundle, work / "b-target", "bench-target")
        self.big_dir = variant(bundle, work / "b-big", "bench-big", self.pad_bytes)
        self.base = self.register(self.base_dir)
        self.target = self.register(self.target_dir)
        self.big = self.register(self.big_dir)

    def cloud_config(self, port: int) -> CloudConfig:
        """The bench's cloud (one registry and store) talking to the broker on ``port``."""
        return parse_cloud_config({"data_dir": "cloud", "store": {"path": "cloud.db"}, "mqtt": {"port": port}}, base=self.work)

    def register(self, bundle_dir: Path, *, check: bool = True) -> RegisteredModel:
        with open_ota_store(self.cfg) as store:
            return Registry(self.cfg, store).add(bundle_dir, check=check)

    def device_raw(self, name: str, groups: list[str], port: int | None = None) -> dict[str, Any]:
        root = self.work / "devices" / name
        (root / "frames").mkdir(parents=True, exist_ok=True)
        return {"device_id": name, "groups": groups, "camera": {"source": str(root / "frames")}, "model": {"path": str(root / "models")},
                "buffer": {"path": str(root / "buffer.db")}, "mqtt": {"port": port or self.broker.port, "keepalive_s": 5},
                "ota": {"trusted_keys": [str(public_key_path(self.cfg))]}}  # fmt: skip

    def device(self, name: str, groups: list[str], port: int | None = None) -> tuple[AgentConfig, ModelStore]:
        root = self.work / "devices" / name
        config = parse_config(self.device_raw(name, groups, port), base=root)
        store = ModelStore(config.model.path)
        res = install_bundle(self.base.path, store, config.ota, None)
        assert res.ok, res.reason
        with open_store(self.cfg) as cs:
            cs.record_status(
                StatusPayload(v=1, state="online", device_id=name, ts=time.time(), model_version="bench-base", groups=groups),
                received=time.time(), retained=False,
            )  # fmt: skip
        return config, store

    def close(self) -> None:
        self.broker.kill()


def wire_ratio(b: Bench) -> dict[str, Any]:
    out = {}
    for label, model in (("bundle", b.target), ("padded", b.big)):
        config, _ = b.device(f"wire-{label}", [f"wire-{label}"])
        client = OtaClient(config)
        client.start()
        t0 = time.monotonic()
        outcome = run_push(b.cfg, model, f"wire-{label}", timeout_s=120, echo=lambda _s: None)
        dt = time.monotonic() - t0
        client.stop()
        client.join()
        wire = client.stats["bytes_in"] + client.stats["bytes_out"]
        out[label] = {
            "state": outcome.state, "bundle_bytes": model.size, "wire_bytes": wire, "ratio": round(wire / model.size, 4),
            "seconds": round(dt, 2), "chunks": -(-model.size // 65536), "requests": client.stats["requests"],
        }  # fmt: skip
    return out


def cut(b: Bench, how: str) -> dict[str, Any]:
    """Cut at 40% of a rate-limited transfer; count chunks the cloud sent twice and chunks the
    device received twice.

    ``how``: ``network`` (the link for 2 s), ``device`` (process restart), ``broker`` (kill -9
    of a broker without persistence: sessions lost), ``broker-persistent`` (SIGTERM restart
    of a broker with persistence, as the site template: sessions kept).
    """
    name = f"cut-{how}"
    broker = b.broker
    cfg = b.cfg
    if how == "broker-persistent":
        broker = Mosquitto(b.work, persistent=True)
        broker.start()
        cfg = b.cloud_config(broker.port)
    proxy = CutProxy(broker.port) if how == "network" else None
    config, store = b.device(name, [name], port=proxy.port if proxy else broker.port)
    size = b.big.size
    srv = OtaServer(cfg, rate_limit_bps=max(500_000.0, size / 4.0))  # about 4 s for the file
    srv.start()
    client = OtaClient(config)
    client.start()
    result: dict[str, Any] = {}
    pusher = threading.Thread(
        target=lambda: result.update(outcome=run_push(cfg, b.big, name, timeout_s=120, server=srv, echo=lambda _s: None))
    )
    pusher.start()
    chunks = -(-size // 65536)
    deadline = time.monotonic() + 60
    while client.stats["chunks"] < 0.4 * chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    had = client.stats["chunks"]
    duplicates = 0
    stats: dict[str, int] = {}
    if how == "device":
        client.stop()
        client.join()
        duplicates += client.stats["duplicates"]
        stats = dict(client.stats)
        client = OtaClient(config)
        client.start()
    elif how == "network":
        assert proxy is not None
        proxy.cut(2.0)
    elif how == "broker":
        broker.kill()
        time.sleep(0.5)
        broker.start()
    else:
        broker.terminate()
        time.sleep(0.5)
        broker.start()
    pusher.join(150)
    client.stop()
    client.join()
    duplicates += client.stats["duplicates"]
    for k, v in client.stats.items():
        stats[k] = stats.get(k, 0) + v
    srv.stop()
    srv.join()
    if proxy is not None:
        proxy.close()
    if broker is not b.broker:
        broker.kill()
    twice = sorted(i for (_d, _t, i), n in srv.sent.items() if n > 1)
    outcome = result.get("outcome")
    return {
        "state": outcome.state if outcome else "no outcome", "chunks": chunks, "received_before_cut": had,
        "chunks_sent_twice": len(twice), "indexes_sent_twice": twice, "chunks_received_twice": duplicates,
        "chunks_sent": srv.stats["chunks_sent"], "device_requests": stats.get("requests"),
        "device_re_requested": stats.get("re_requested"), "active_version": Classifier(store.current()).version,
    }  # fmt: skip


# -- inference during a download -------------------------------------------------------------------


def probe(config_file: Path, cpu: int | None) -> None:
    """Child process: the device side alone (an inference thread and an OtaClient), as on a box.

    Decides a frame in a loop and records (time, ms) per decision, and the client's OTA state
    changes; prints ``ready`` once connected, and everything as JSON when stdin says ``stop``.
    """
    import numpy as np

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before any thread starts: they all inherit it
    raw = json.loads(config_file.read_text())
    config = parse_config(raw, base=config_file.parent)
    clf = Classifier(ModelStore(config.model.path).current(), num_threads=1)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    client = OtaClient(config)
    client.start()
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    states: list[tuple[float, str, str | None, dict[str, float]]] = []

    def infer() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            clf.predict(frame)
            samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000.0))
            time.sleep(0.002)  # ~300 parts/s: the line leaves the CPU some air

    def watch_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    deadline = time.monotonic() + 20
    while not client.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Thread(target=infer, name="infer", daemon=True).start()
    threading.Thread(target=watch_stdin, daemon=True).start()
    print("ready", flush=True)
    last: tuple[str, str | None] | None = None
    tids = ota_threads(client)
    tids["infer"] = next(th.native_id for th in threading.enumerate() if th.name == "infer" and th.native_id)
    nice = thread_nice(tids)
    while not stop.is_set():
        st = client.state
        key = (st["state"], st.get("transfer")) if st else None
        if key is not None and key != last:
            states.append((time.monotonic(), *key, thread_cpu_s(tids)))
            last = key
        time.sleep(0.005)
    cpu_s = thread_cpu_s(tids)
    client.stop()
    client.join()
    print(json.dumps({"samples": samples, "states": states, "nice": nice, "thread_cpu_s": cpu_s, "cpu": cpu}), flush=True)


def ota_threads(client: OtaClient) -> dict[str, int]:
    """Native ids of the OTA worker thread and paho's network thread."""
    paho = getattr(client._client, "_thread", None)
    out = {}
    for label, th in (("ota_worker", client._thread), ("paho_network", paho)):
        if th is not None and th.native_id is not None:
            out[label] = th.native_id
    return out


def thread_nice(tids: dict[str, int]) -> dict[str, int]:
    """Nice value of each thread (per thread on Linux: what _lower_priority set)."""
    out = {}
    for label, tid in tids.items():
        with contextlib.suppress(OSError):
            out[label] = os.getpriority(os.PRIO_PROCESS, tid)
    return out


def thread_cpu_s(tids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each thread has run so far (/proc schedstat: nanoseconds, unlike stat's ticks)."""
    out = {}
    for label, tid in tids.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[label] = round(int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[0]) / 1e9, 4)
    return out


def p99_during_download(b: Bench, seconds: float, pairs: int, pin: bool) -> dict[str, Any]:
    """Inference p99 in one device process over alternating idle and download windows.

    Each download is a new version (a download, not a switch back to the kept previous one),
    rate-limited to last about ``seconds``. The verification, validation and switch after
    each download are outside both kinds of window: an idle window starts once the device
    has been active for a second.
    """
    import numpy as np

    cpus = sorted(os.sched_getaffinity(0))
    child_cpu = cpus[-1] if pin and len(cpus) >= 2 else None
    if child_cpu is not None:
        os.sched_setaffinity(0, set(cpus) - {child_cpu})  # this process (cloud side) and the broker: the other cores
        # the broker was started before: move it too
        if b.broker.proc is not None:
            os.sched_setaffinity(b.broker.proc.pid, set(cpus) - {child_cpu})
    models = [b.register(variant(b.bundle, b.work / f"b-dl{i}", f"bench-dl{i}", b.pad_bytes), check=False) for i in range(pairs)]
    b.device("p99", ["p99"])
    cfg_file = b.work / "p99.json"
    cfg_file.write_text(json.dumps(b.device_raw("p99", ["p99"])))
    cmd = [sys.executable, __file__, "--probe", str(cfg_file)] + (["--probe-cpu", str(child_cpu)] if child_cpu is not None else [])
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    srv = OtaServer(b.cfg, rate_limit_bps=models[0].size / seconds)  # each download lasts about `seconds`
    srv.start()
    idle_windows: list[tuple[float, float]] = []
    time.sleep(1.0)  # the child's start-up (connect, first decisions) is not idle time
    try:
        for model in models:
            t0 = time.monotonic()
            time.sleep(seconds)
            idle_windows.append((t0, time.monotonic()))
            outcome = run_push(b.cfg, model, "p99", timeout_s=120, server=srv, echo=lambda _s: None)
            assert outcome.state == "done", outcome
            time.sleep(1.0)  # install, golden run and switch: in neither window
    finally:
        child.stdin.write("stop\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
        child.wait(30)
        srv.stop()
        srv.join()
        if child_cpu is not None:
            os.sched_setaffinity(0, set(cpus))
    samples = report["samples"]
    # download windows: from a transfer's first `downloading` to the first state after it
    download_windows: list[tuple[float, float]] = []
    states = report["states"]
    download_cpu_ms: dict[str, list[float]] = {}
    for i, (t, state, transfer, cpu0) in enumerate(states):
        if state == "downloading" and (i == 0 or states[i - 1][2] != transfer or states[i - 1][1] != "downloading"):
            end = next(((t2, cpu2) for t2, s2, tr2, cpu2 in states[i + 1 :] if tr2 != transfer or s2 != "downloading"), None)
            if end is not None:
                download_windows.append((t, end[0]))
                for label in ("ota_worker", "paho_network"):
                    if label in cpu0 and label in end[1]:
                        download_cpu_ms.setdefault(label, []).append(round((end[1][label] - cpu0[label]) * 1000.0))

    def window(w: tuple[float, float]) -> list[float]:
        return [ms for t, ms in samples if w[0] <= t < w[1]]

    def p(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    idle = [window(w) for w in idle_windows]
    busy = [window(w) for w in download_windows]
    idle_p99 = [round(p(v, 99), 3) for v in idle]
    busy_p99 = [round(p(v, 99), 3) for v in busy]
    med_idle, med_busy = statistics.median(idle_p99), statistics.median(busy_p99)
    pooled_idle = [x for v in idle for x in v]
    pooled_busy = [x for v in busy for x in v]
    return {
        "pairs": pairs, "window_s": seconds, "device_cpu": child_cpu, "thread_nice": report["nice"],
        "thread_cpu_s": report["thread_cpu_s"], "chunks_per_download": -(-models[0].size // 65536),
        "download_thread_cpu_ms": download_cpu_ms,
        "download_seconds": [round(e - s, 2) for s, e in download_windows],
        "idle_n": [len(v) for v in idle], "download_n": [len(v) for v in busy],
        "idle_p99_ms": idle_p99, "download_p99_ms": busy_p99,
        "idle_p99_median_ms": med_idle, "download_p99_median_ms": med_busy,
        "p99_ratio": round(med_busy / med_idle, 3),
        # each download window against the idle window just before it (the same background load)
        "paired_p99_ratio_median": round(statistics.median(b_ / i_ for i_, b_ in zip(idle_p99, busy_p99, strict=False)), 3),
        "idle_p50_ms": round(p(pooled_idle, 50), 3), "download_p50_ms": round(p(pooled_busy, 50), 3),
        "pooled_p99_ratio": round(p(pooled_busy, 99) / p(pooled_idle, 99), 3),
    }  # fmt: skip


def fleet_push(b: Bench, n: int) -> dict[str, Any]:
    clients = []
    for i in range(n):
        config, _ = b.device(f"fleet-{i:02d}", ["fleet"])
        c = OtaClient(config)
        c.start()
        clients.append(c)
    srv = OtaServer(b.cfg)
    srv.start()
    t0 = time.monotonic()
    outcome = run_push(b.cfg, b.target, "fleet", canary="10%", min_success=0.95, timeout_s=300, server=srv, echo=lambda _s: None)
    dt = time.monotonic() - t0
    for c in clients:
        c.stop()
    for c in clients:
        c.join()
    srv.stop()
    srv.join()
    ok = sum(1 for v in outcome.devices.values() if v == "success")
    return {
        "devices": n, "state": outcome.state, "succeeded": ok, "seconds": round(dt, 2), "bundle_bytes": b.target.size,
        "cloud_bytes_sent": srv.stats["bytes_sent"], "bytes_per_device": round(srv.stats["bytes_sent"] / n),
        "chunks_sent": srv.stats["chunks_sent"], "chunks_sent_twice": sum(1 for v in srv.sent.values() if v > 1),
    }  # fmt: skip


def summary(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; {report['machine']['uptime']}"]
    if "wire" in report:
        w = report["wire"]
        lines.append(
            f"wire/bundle: {w['bundle']['ratio']} ({w['bundle']['bundle_bytes']} B), {w['padded']['ratio']} padded "
            f"({w['padded']['bundle_bytes']} B) [target <= 1.05]"
        )
    cuts = [
        (k, report[k])
        for k in ("cut_network", "cut_device_restart", "cut_broker_restart", "cut_broker_restart_persistent")
        if k in report
    ]
    if cuts:
        lines.append(
            "chunks sent twice (received twice) after a cut: "
            + ", ".join(f"{k[4:]} {c['chunks_sent_twice']} ({c['chunks_received_twice']})" for k, c in cuts)
            + " [target <= 1]"
        )
    if "inference_during_download" in report:
        inf = report["inference_during_download"]
        lines.append(
            f"inference p99, median of {inf['pairs']} windows each: idle {inf['idle_p99_median_ms']} ms, during download "
            f"{inf['download_p99_median_ms']} ms: x{inf['p99_ratio']} (paired x{inf['paired_p99_ratio_median']}, "
            f"pooled x{inf['pooled_p99_ratio']}) [target <= 1.1]\n"
            f"  idle windows {inf['idle_p99_ms']}, download windows {inf['download_p99_ms']}"
        )
    if "fleet_push" in report:
        fl = report["fleet_push"]
        lines.append(
            f"{fl['devices']} devices from one push: {fl['state']}, {fl['succeeded']} ok in {fl['seconds']} s, "
            f"{fl['cloud_bytes_sent']} B sent ({fl['bytes_per_device']} B per device for a {fl['bundle_bytes']} B bundle)"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--pad-mb", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each idle and download inference window")
    ap.add_argument("--pairs", type=int, default=5, help="idle/download window pairs for the inference measurement")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the device process to its own core")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-cpu", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.probe_cpu)
        return 0
    parts = set(args.only or PARTS)
    bundle = args.bundle or default_bundle()
    report: dict[str, Any] = {"bundle": str(bundle), "command": " ".join(sys.argv), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="lw-ota-bench-") as tmp:
        b = Bench(Path(tmp), bundle, args.pad_mb)
        try:
            if "wire" in parts:
                report["wire"] = wire_ratio(b)
            if "cuts" in parts:
                report["cut_network"] = cut(b, "network")
                report["cut_device_restart"] = cut(b, "device")
                report["cut_broker_restart"] = cut(b, "broker")
                report["cut_broker_restart_persistent"] = cut(b, "broker-persistent")
            if "inference" in parts:
                report["inference_during_download"] = p99_during_download(b, args.seconds, args.pairs, args.pin)
            if "fleet" in parts:
                report["fleet_push"] = fleet_push(b, args.devices)
        finally:
            b.close()
    report["machine_after"] = machine()
    OUT.mkdir(exist_ok=True)
    (OUT / "ota.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(summary(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
