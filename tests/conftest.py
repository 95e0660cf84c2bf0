"""Shared fixtures: a real Mosquitto on a free port, a tiny real int8 bundle, agent configs.

Everything here is real: the broker is the mosquitto binary, the model is trained and
quantized by the project's own trainer (once per test run, shared by xdist workers
through a lock file), databases are SQLite files under tmp_path.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LINEWATCH, Proc, free_port, reap_started, start_ingest, write_cloud_config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or `sudo apt-get install mosquitto`")
    return found


@dataclass
class Broker:
    """A Mosquitto process on 127.0.0.1:port that a test may stop and start again."""

    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"

    def start(self) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.log.read_text()}") from None
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def make_broker(directory: Path, port: int | None = None) -> Broker:
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = directory / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_packet_size 1048576\n"
        "max_queued_messages 100000\n"
        "set_tcp_nodelay true\n"
        "log_type error\nlog_type warning\n"
    )
    return Broker(port=port, conf=conf, log=directory / "mosquitto.log")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto for this test on a free loopback port."""
    b = make_broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def reaper() -> Iterator[None]:
    """Whatever a test started as a :class:`tests.helpers.Proc` and left running (it failed
    half-way) is killed by its pid."""
    yield
    reap_started()


@pytest.fixture
def cloud(tmp_path: Path, broker: Broker) -> Iterator[tuple[Path, Proc]]:
    """A cloud config and one running ingest worker."""
    toml = write_cloud_config(tmp_path / "cloud", broker)
    p = start_ingest(toml)
    yield toml, p
    p.term()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny but real int8 bundle made by the trainer once per run (shared by xdist workers).

    Read-only: copy it (``shutil.copytree``) before changing anything in it.
    ``LINEWATCH_TEST_BUNDLE`` points at a ready bundle instead (quicker local runs).
    """
    if os.environ.get("LINEWATCH_TEST_BUNDLE"):
        return Path(os.environ["LINEWATCH_TEST_BUNDLE"])
    return shared_bundle(tmp_path_factory, "tiny-1", seed=0)


def shared_bundle(tmp_path_factory: pytest.TempPathFactory, version: str, **kwargs: object) -> Path:
    """Build a bundle once per test run, whichever xdist worker asks first."""
    # One folder per test run, shared by its xdist workers (never reused by a later run,
    # so a changed trainer is always exercised).
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    root = base.parent / f"bundles-{run_id}" if run_id else base / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"bundle-{version}"
    with open(root / f"bundle-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "manifest.json").exists():
            from training.tiny import make_tiny_bundle

            staging = root / f"bundle-{version}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            make_tiny_bundle(staging, version=version, **kwargs)  # type: ignore[arg-type]
            staging.rename(target)
    return target


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny bundle."""
    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write an agent TOML config into tmp_path; keyword sections override the defaults."""

    def write(text: str, name: str = "agent.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``linewatch`` command as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([LINEWATCH, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def wait_status(cfg: Path, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
    """`edge status --json` until ``pred`` holds on it; the last status in the failure."""
    last: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run_cli("edge", "status", "--config", str(cfg), "--json")
        if proc.returncode == 0:
            last = json.loads(proc.stdout)
            if pred(last):
                return last
        time.sleep(0.3)
    raise AssertionError(f"status never matched: {last}")


# Two compatible versions of the tiny model, for OTA, registry and rollout tests.
@pytest.fixture(scope="session")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory, "tiny-1", seed=0)


@pytest.fixture(scope="session")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_bundle(tmp_path_factory, "tiny-2", seed=1)
