"""Benchmark over-the-air delivery on a real Mosquitto with real bundles.

    python benchmarks/ota.py [--bundle DIR] [--devices 20] [--pad-mb 4]

Prints one JSON object on stdout (also written to bench-out/ota.json) and a summary on
stderr. The bundle is the trained benchmark bundle if there is one (bench-out/bundle-synth,
demo-out/bundle-v1), else a tiny one made now; a copy of it under another version is the
model every device starts with. ``--pad-mb`` adds that many MB of random bytes to the
report folder of a second bundle, to see a model of realistic size on the wire.

Measured:

- wire bytes / bundle bytes for one device (target <= 1.05): every MQTT payload and topic
  the device received or sent for the update (chunks, requests, desired, states), over the
  packed bundle size; MQTT fixed headers (2-5 bytes per packet) are not counted;
- chunks sent twice after a cut (target <= 1): the device process is stopped when 40% of a
  rate-limited transfer is in, then started again; and the broker is killed and restarted
  mid-transfer. Counted at the server: chunks it sent more than once;
- inference p99 while a device downloads vs idle (target <= 1.1x): one thread decides a
  frame in a loop with the running model, first idle, then during a download;
- 20 devices from one push: wall time from ``run_push`` to every device active, and bytes
  the cloud sent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
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
from cloud.registry import Registry, init_keys, open_ota_store, public_key_path  # noqa: E402
from cloud.rollout import OtaServer, run_push  # noqa: E402
from cloud.store import open_store  # noqa: E402
from edge.config import AgentConfig, parse_config  # noqa: E402
from edge.inference import Classifier  # noqa: E402
from edge.models import ModelStore  # noqa: E402
from edge.ota import OtaClient, install_bundle  # noqa: E402
from edge.protocol import MANIFEST_FILE, StatusPayload  # noqa: E402

OUT = REPO / "bench-out"


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


class Mosquitto:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.conf = work / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n")
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
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
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
        self.broker = Mosquitto(work)
        self.broker.start()
        self.cfg: CloudConfig = parse_cloud_config(
            {"data_dir": "cloud", "store": {"path": "cloud.db"}, "mqtt": {"port": self.broker.port}}, base=work
        )
        init_keys(self.cfg)
        self.base_dir = variant(bundle, work / "b-base", "bench-base")
        self.target_dir = variant(bundle, work / "b-target", "bench-target")
        self.big_dir = variant(bundle, work / "b-big", "bench-big", int(pad_mb * 1_000_000))
        with open_ota_store(self.cfg) as store:
            reg = Registry(self.cfg, store)
            self.base = reg.add(self.base_dir)
            self.target = reg.add(self.target_dir)
            self.big = reg.add(self.big_dir)

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
    """Cut at 40% of a rate-limited transfer (the network for 2 s, the device process, or the
    broker); count chunks the cloud sent twice and chunks the device received twice."""
    name = f"cut-{how}"
    proxy = CutProxy(b.broker.port) if how == "network" else None
    config, store = b.device(name, [name], port=proxy.port if proxy else None)
    size = b.big.size
    srv = OtaServer(b.cfg, rate_limit_bps=max(500_000.0, size / 4.0))  # about 4 s for the file
    srv.start()
    client = OtaClient(config)
    client.start()
    result: dict[str, Any] = {}
    pusher = threading.Thread(
        target=lambda: result.update(outcome=run_push(b.cfg, b.big, name, timeout_s=120, server=srv, echo=lambda _s: None))
    )
    pusher.start()
    chunks = -(-size // 65536)
    deadline = time.monotonic() + 60
    while client.stats["chunks"] < 0.4 * chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    had = client.stats["chunks"]
    duplicates = 0
    if how == "device":
        client.stop()
        client.join()
        duplicates += client.stats["duplicates"]
        client = OtaClient(config)
        client.start()
    elif how == "network":
        assert proxy is not None
        proxy.cut(2.0)
    else:
        b.broker.kill()
        time.sleep(0.5)
        b.broker.start()
    pusher.join(150)
    client.stop()
    client.join()
    duplicates += client.stats["duplicates"]
    srv.stop()
    srv.join()
    if proxy is not None:
        proxy.close()
    twice = sum(1 for n in srv.sent.values() if n > 1)
    outcome = result.get("outcome")
    return {
        "state": outcome.state if outcome else "no outcome", "chunks": chunks, "received_before_cut": had,
        "chunks_sent_twice": twice, "chunks_received_twice": duplicates, "chunks_sent": srv.stats["chunks_sent"],
        "active_version": Classifier(store.current()).version,
    }  # fmt: skip


def probe(config_file: Path, seconds: float) -> None:
    """Child process: the device side alone (inference thread + OtaClient), as on a box."""
    import numpy as np

    raw = json.loads(config_file.read_text())
    config = parse_config(raw, base=config_file.parent)
    clf = Classifier(ModelStore(config.model.path).current(), num_threads=1)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    client = OtaClient(config)
    client.start()

    def sample(until: Any) -> list[float]:
        times = []
        while not until():
            t0 = time.perf_counter()
            clf.predict(frame)
            times.append((time.perf_counter() - t0) * 1000.0)
            time.sleep(0.002)  # ~300 parts/s: the line leaves the CPU some air
        return times

    end = time.monotonic() + seconds
    idle = sample(lambda: time.monotonic() > end)
    print(json.dumps({"idle": idle}), flush=True)
    deadline = time.monotonic() + 60
    while (client.state is None or client.state["state"] != "downloading") and time.monotonic() < deadline:
        time.sleep(0.002)
    busy = sample(lambda: client.state is None or client.state["state"] != "downloading" or time.monotonic() > deadline + 60)
    print(json.dumps({"busy": busy}), flush=True)
    while (client.state is None or client.state["state"] not in ("active", "failed")) and time.monotonic() < deadline + 90:
        time.sleep(0.05)
    client.stop()
    client.join()


def p99_during_download(b: Bench, seconds: float) -> dict[str, Any]:
    """Inference p99 in a device process, idle then while it downloads (cloud in this process)."""
    import numpy as np

    b.device("p99", ["p99"])
    cfg_file = b.work / "p99.json"
    cfg_file.write_text(json.dumps(b.device_raw("p99", ["p99"])))
    child = subprocess.Popen(
        [sys.executable, __file__, "--probe", str(cfg_file), "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    idle = json.loads(child.stdout.readline())["idle"]
    srv = OtaServer(b.cfg, rate_limit_bps=b.big.size / seconds)  # the download lasts about `seconds`
    srv.start()
    pusher = threading.Thread(target=lambda: run_push(b.cfg, b.big, "p99", timeout_s=120, server=srv, echo=lambda _s: None))
    pusher.start()
    busy = json.loads(child.stdout.readline())["busy"]
    pusher.join(120)
    child.wait(60)
    child.stdout.close()
    srv.stop()
    srv.join()

    def p(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    return {
        "idle_n": len(idle), "idle_p50_ms": round(p(idle, 50), 3), "idle_p99_ms": round(p(idle, 99), 3),
        "download_n": len(busy), "download_p50_ms": round(p(busy, 50), 3), "download_p99_ms": round(p(busy, 99), 3),
        "p99_ratio": round(p(busy, 99) / p(idle, 99), 3) if idle and busy else None,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--pad-mb", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the idle and download inference samples")
    ap.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe(args.probe, args.seconds)
        return 0
    bundle = args.bundle or default_bundle()
    with tempfile.TemporaryDirectory(prefix="lw-ota-bench-") as tmp:
        b = Bench(Path(tmp), bundle, args.pad_mb)
        try:
            report: dict[str, Any] = {
                "bundle": str(bundle),
                "wire": wire_ratio(b),
                "cut_network": cut(b, "network"),
                "cut_device_restart": cut(b, "device"),
                "cut_broker_restart": cut(b, "broker"),
                "inference_during_download": p99_during_download(b, args.seconds),
                "fleet_push": fleet_push(b, args.devices),
            }
        finally:
            b.close()
    OUT.mkdir(exist_ok=True)
    (OUT / "ota.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    w, c0, c1, c2 = report["wire"], report["cut_network"], report["cut_device_restart"], report["cut_broker_restart"]
    inf, fl = report["inference_during_download"], report["fleet_push"]
    print(
        f"wire/bundle: {w['bundle']['ratio']} ({w['bundle']['bundle_bytes']} B), {w['padded']['ratio']} padded "
        f"({w['padded']['bundle_bytes']} B) [target <= 1.05]\n"
        f"chunks sent twice (received twice) after a cut: network {c0['chunks_sent_twice']} ({c0['chunks_received_twice']}), "
        f"device restart {c1['chunks_sent_twice']} ({c1['chunks_received_twice']}), "
        f"broker restart {c2['chunks_sent_twice']} ({c2['chunks_received_twice']}) [target <= 1]\n"
        f"inference p99 idle {inf['idle_p99_ms']} ms, during download {inf['download_p99_ms']} ms: x{inf['p99_ratio']} [target <= 1.1]\n"
        f"{fl['devices']} devices from one push: {fl['state']}, {fl['succeeded']} ok in {fl['seconds']} s, "
        f"{fl['cloud_bytes_sent']} B sent ({fl['bytes_per_device']} B per device for a {fl['bundle_bytes']} B bundle)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
