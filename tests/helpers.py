"""Helpers shared by several test modules: ports, polling, images and videos on disk,
the processes and configs of the sync and fleet tests, wire payloads, OTA stand-ins, the
agent as a process and the pictures it annotates.

Fixtures live in conftest.py; these are plain functions a test imports by name. Test
modules share code only through this file and conftest.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge.buffer import Buffer, ResultRecord, SampleRecord
from edge.config import load_config
from edge.protocol import SAMPLE_CHUNK_BYTES
from edge.signing import generate_keypair, load_private_key

if TYPE_CHECKING:
    from edge.inference import Classifier
    from edge.ota import OtaClient
    from tests.conftest import Broker

LINEWATCH = str(Path(sys.executable).parent / "linewatch")  # the installed command, as a user runs it


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_images(folder: Path, n: int, *, seed: int, size: int = 24, prefix: str = "img", color: bool = False) -> list[Path]:
    """n distinct random images (png) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        shape = (size, size + 3, 3) if color else (size, size + 3)
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        path = folder / f"{prefix}_{i:04d}.png"
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def write_video(path: Path, frames: int, size: tuple[int, int] = (320, 240), fps: int = 25) -> None:
    """A video whose frame i shows part i (alternating clean and scratched surfaces)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for i in range(frames):
        img = np.full((size[1], size[0], 3), 120, np.uint8)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        if i % 3 == 0:
            cv2.line(img, (20, 20 + i % 50), (size[0] - 30, size[1] - 40), (30, 30, 30), 2, cv2.LINE_AA)
        writer.write(img)
    writer.release()


def invoke_train(*args: str) -> tuple[int, str]:
    """``linewatch train ARGS`` in-process: (exit code, output)."""
    from training.cli import (
        train,  # the trainer's CLI imports are heavy; only the tests that use it pay
    )

    result = CliRunner().invoke(train, list(args))
    return result.exit_code, result.output


# -- the sync, ingest and fleet tests: configs, buffers and processes ---------------------------

PREFIX = "lwtest"

DEVICE_SCRIPT = """
import logging, signal, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from edge.config import load_config
from edge.sync import SyncClient
cfg = load_config(sys.argv[1])
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
client = SyncClient(cfg, status=lambda: {"model_version": sys.argv[2]}, reconnect_min_s=0.1, reconnect_max_s=0.8)
client.start()
print("started", flush=True)
while not stop.wait(0.2):  # a timed wait: the handler runs even if another thread got the signal
    pass
client.stop()
client.join(3)
print("stopped", flush=True)
"""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what} (last value {value!r})")
        time.sleep(interval)


def write_cloud_config(directory: Path, broker: Broker, **sections: dict[str, Any]) -> Path:
    """A cloud TOML for ``broker`` with short fleet timeouts; sections override keys."""
    directory.mkdir(parents=True, exist_ok=True)
    data: dict[str, dict[str, Any]] = {
        "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX},
        "ingest": {"share_group": "ingest", "log_interval_s": 1.0},
        "fleet": {"offline_after_s": 30, "dead_after_s": 60},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines = ['data_dir = "cloud-data"', 'store.path = "cloud.db"']
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = directory / "cloud.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_agent_config(directory: Path, broker: Broker, device_id: str, *, max_bytes: int = 50_000_000, **mqtt_keys: Any) -> Path:
    """An agent TOML whose only live parts here are [mqtt] and the buffer."""
    directory.mkdir(parents=True, exist_ok=True)
    mqtt_cfg = {"host": broker.host, "port": broker.port, "topic_prefix": PREFIX, "ack_timeout_s": 1.0,
                "status_interval_s": 0.5, "keepalive_s": 5, **mqtt_keys}  # fmt: skip
    text = (
        f'device_id = "{device_id}"\ngroups = ["line1"]\ncamera.source = "parts.mp4"\nmodel.path = "models"\n'
        f'buffer.path = "buffer.db"\nbuffer.max_bytes = {max_bytes}\n[mqtt]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in mqtt_cfg.items())
    )
    path = directory / "agent.toml"
    path.write_text(text)
    return path


def fill_buffer(agent_toml: Path, n: int, *, start_part: int = 0, samples: Sequence[bytes] = (), events: int = 0) -> None:
    """Commit ``n`` results (every third a fail), some samples and events, as the agent would."""
    cfg = load_config(agent_toml)
    with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, device_id=cfg.device_id) as buf:
        now = time.time()
        recs = [
            ResultRecord(now + i * 1e-3, cfg.device_id, start_part + i, "m1", "scratch" if i % 3 == 0 else "ok",
                         0.9 if i % 3 == 0 else 0.1, i % 3 != 0, 1.0, 0.5, 0.3)  # fmt: skip
            for i in range(n)
        ]
        for i in range(0, n, 500):
            buf.record_results(recs[i : i + 500])
        for j, jpeg in enumerate(samples):
            buf.record_sample(SampleRecord(now, "fail", "scratch", 0.9, 32, 24, jpeg, result_seq=j + 1))
        for j in range(events):
            buf.record_event("camera_up", source="parts.mp4", n=j)


def unsynced(agent_toml: Path) -> dict[str, int]:
    cfg = load_config(agent_toml)
    with Buffer.open_readonly(cfg.buffer.path) as buf:
        return buf.unsynced_counts()


def all_synced(agent_toml: Path) -> bool:
    return sum(unsynced(agent_toml).values()) == 0


_STARTED: list[Proc] = []


class Proc:
    """A subprocess with its output in a file (no pipe to fill up), killable by pid."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _STARTED.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.output() or self.proc.poll() is not None, timeout, f"{text!r} in {self.log}")
        assert text in self.output(), f"process exited early:\n{self.output()}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def term(self, timeout: float = 10) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)


def reap_started() -> None:
    """Kill every :class:`Proc` still running, by its pid (conftest's ``reaper`` runs this
    after each test)."""
    while _STARTED:
        p = _STARTED.pop()
        if p.alive():
            p.proc.send_signal(signal.SIGCONT)  # in case a test stopped it (SIGSTOP)
            p.proc.kill()
        p.proc.wait(10)


def start_ingest(cloud_toml: Path, name: str = "ingest") -> Proc:
    """``linewatch cloud serve`` as a subprocess, returned once it is connected."""
    p = Proc([LINEWATCH, "-v", "cloud", "serve", "--config", str(cloud_toml)], cloud_toml.parent / f"{name}.log")
    p.wait_for("connected to")
    return p



def start_device(agent_toml: Path, model_version: str = "m1") -> Proc:
    """A device process running SyncClient over its buffer."""
    p = Proc([sys.executable, "-c", DEVICE_SCRIPT, str(agent_toml), model_version], agent_toml.parent / "device.log")
    p.wait_for("started")
    return p



def cloud_seqs(cloud_toml: Path, device_id: str, table: str = "results") -> list[int]:
    """Every stored seq of one device, duplicates included if there were any."""
    db = cloud_toml.parent / "cloud.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT seq FROM {table} WHERE device_id = ? ORDER BY rowid", (device_id,))]



def cloud_query(cloud_toml: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{cloud_toml.parent / 'cloud.db'}?mode=ro", uri=True) as conn:
        return list(conn.execute(sql, params))


def fleet_states(cwd: Path) -> dict[str, dict[str, object]]:
    """`cloud fleet --json` run in ``cwd``, by device id."""
    out = subprocess.run([LINEWATCH, "cloud", "fleet", "--json"], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return {d["device_id"]: d for d in json.loads(out.stdout)}


# -- wire payloads ------------------------------------------------------------------------------


def results_payload(device_id: str, seqs: list[int], batch: str = "b1", **over: Any) -> dict[str, Any]:
    n = len(seqs)
    body: dict[str, Any] = {
        "v": 1, "type": "results", "device_id": device_id, "batch": batch, "first_seq": seqs[0], "last_seq": seqs[-1],
        "seq": seqs,
        "cols": {"ts": [1.0] * n, "part_id": list(seqs), "model_version": ["m1"] * n, "label": ["ok"] * n,
                 "score": [0.1] * n, "passed": [True] * n, "capture_ms": [None] * n, "preprocess_ms": [None] * n,
                 "invoke_ms": [None] * n, "record_ms": [None] * n},
    }  # fmt: skip
    body.update(over)
    return body



def sample_chunks(device_id: str, seq: int, jpeg: bytes) -> list[dict[str, Any]]:
    parts = [jpeg[i : i + SAMPLE_CHUNK_BYTES] for i in range(0, len(jpeg), SAMPLE_CHUNK_BYTES)]
    digest = hashlib.sha256(jpeg).hexdigest()
    return [
        {"v": 1, "type": "sample", "device_id": device_id, "batch": f"s{seq}.{i}", "seq": seq, "ts": 1.0,
         "reason": "fail", "label": "scratch", "score": 0.9, "width": 8, "height": 8, "bytes": len(jpeg),
         "sha256": digest, "chunk": i, "chunks": len(parts), "data": base64.b64encode(p).decode()}  # fmt: skip
        for i, p in enumerate(parts)
    ]


# -- OTA: keys and the agent's side of the transfer --------------------------------------------


class Keys:
    def __init__(self, root: Path) -> None:
        self.private, self.public = root / "signing.key", root / "signing.pub"
        generate_keypair(self.private, self.public)
        self.key = load_private_key(self.private)



class Host:
    """The slice of the agent OtaClient talks to (swap_model, note_event, classifier).

    Like Agent, it adopts a swapped model before its next frame; here at once.
    """

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.swapped: list[Classifier] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def swap_model(self, classifier: Classifier) -> None:
        self.swapped.append(classifier)
        self.classifier = classifier

    def note_event(self, kind: str, **detail: Any) -> None:
        self.events.append((kind, detail))

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]



def state_is(client: OtaClient, *states: str) -> Callable[[], bool]:
    return lambda: client.state is not None and client.state["state"] in states


# -- the agent as a process ---------------------------------------------------------------------


def agent_config(tmp_path: Path, bundle: Path, source: str, extra: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f"""
device_id = "test-cam"
camera.source = "{source}"
model.path = "{bundle}"
buffer.path = "{tmp_path / 'buffer.db'}"
mqtt.enabled = false
operator.port = 0
{extra}
"""
    )
    return cfg



def start_agent(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [LINEWATCH, "edge", "run", "--config", str(cfg), "--echo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )



def read_decisions(proc: subprocess.Popen[str], n: int, timeout: float = 60) -> list[dict]:
    """Read n echo lines (committed decisions) from the agent."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while len(out) < n and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(json.loads(line))
    return out



def stop(proc: subprocess.Popen[str]) -> float:
    """SIGTERM; returns seconds until the process exited (pipes drained and closed)."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    elapsed = time.monotonic() - t0
    proc.stderr_text = proc.communicate()[1]  # type: ignore[attr-defined]
    return elapsed


# -- annotated pictures -------------------------------------------------------------------------


def red(picture: np.ndarray, x: int, y: int) -> bool:
    b, g, r = (int(v) for v in picture[y, x])
    return r > 170 and g < 90 and b < 90



def decode(jpeg: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert out is not None, "not a JPEG"
    return out



def assert_outline(picture: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Red on all four edges of ``box`` (picture pixels, line drawn inside), not inside or outside it."""
    x, y, w, h = box
    mx, my = x + w // 2, y + h // 2
    edges = {"top": (mx, y + 1), "bottom": (mx, y + h - 2), "left": (x + 1, my), "right": (x + w - 2, my)}
    for name, (px, py) in edges.items():
        assert red(picture, px, py), f"{name} edge at {(px, py)} is {picture[py, px]}, not red"
    ph, pw = picture.shape[:2]
    for px, py in ((mx, my), (x + 8, y + 8), (x - 8, my), (mx, y + h + 8)):
        if 0 <= px < pw and 0 <= py < ph:
            assert not red(picture, px, py), f"{(px, py)} is red but lies off the outline"
