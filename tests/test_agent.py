"""The edge agent as a real process on generated videos with the tiny real model."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge.inference import Prediction
from tests.conftest import LINEWATCH, run_cli, wait_status
from tests.helpers import agent_config, read_decisions, start_agent, stop, write_video


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute("SELECT seq, part_id, label, passed FROM results ORDER BY seq").fetchall()
    finally:
        con.close()


def test_every_frame_one_row_in_order_then_status(tmp_path: Path, tiny_bundle: Path) -> None:
    video = tmp_path / "parts.avi"
    write_video(video, 60)
    cfg = agent_config(tmp_path, tiny_bundle, str(video))
    proc = start_agent(cfg)
    try:
        decisions = read_decisions(proc, 60)
        assert len(decisions) == 60
        status = wait_status(cfg, lambda s: s["camera"]["state"] == "ended")
        live = json.loads((tmp_path / "buffer.status.json").read_text())
        page = urllib.request.urlopen(live["operator_url"], timeout=5).read().decode()
        assert "Linewatch" in page
        api = json.loads(urllib.request.urlopen(live["operator_url"] + "api/status", timeout=5).read())
        assert api["session"]["results"] == 60
        recent = json.loads(urllib.request.urlopen(live["operator_url"] + "api/recent", timeout=5).read())
        assert [r["part_id"] for r in recent] == list(range(31, 61))
    finally:
        elapsed = stop(proc)
    assert proc.returncode == 0, proc.stderr_text  # type: ignore[attr-defined]
    assert elapsed < 2.5
    got = rows(tmp_path / "buffer.db")
    assert [r[1] for r in got] == list(range(1, 61)), "one row per frame, in order"
    assert [d["seq"] for d in decisions] == [r[0] for r in got]
    con = sqlite3.connect(tmp_path / "buffer.db")
    failed = {seq for seq, _, _, passed in got if not passed}
    kept = dict(con.execute("SELECT result_seq, reason FROM samples WHERE reason = 'fail'").fetchall())
    assert set(kept) == failed, "every failed part keeps a sample, linked to its decision"
    for key in ("device_id", "results", "passed", "failed", "unsynced", "model_version", "runtime", "camera"):
        assert key in status
    assert status["results"] == 60 and status["passed"] + status["failed"] == 60
    assert status["unsynced"] == 60
    assert status["model_version"] == "tiny-1"
    assert status["runtime"] == "litert"
    assert status["agent"] == "running"
    # the agent stays up after a file ends; after SIGTERM status says stopped
    after = run_cli("edge", "status", "--config", str(cfg), "--json")
    assert json.loads(after.stdout)["agent"] == "stopped"
    tail = run_cli("edge", "results", "--config", str(cfg), "--tail", "5")
    assert tail.returncode == 0 and len(tail.stdout.strip().splitlines()) == 5


def test_deciding_box_in_frame_pixels_reaches_row_sample_and_operator_page(tmp_path: Path, tiny_bundle: Path) -> None:
    """The real agent in this process, with camera.roi: the box is offset into camera-frame pixels.

    The tiny bundle decides whole frames, so its predictions get the box a tiled bundle would
    report (in the pixels of the ROI picture given to predict); everything else is real.
    """
    from edge.agent import Agent
    from edge.buffer import Buffer
    from edge.config import load_config
    from tests.helpers import assert_outline, decode

    video = tmp_path / "parts.avi"
    write_video(video, 12)  # 320x240
    cfg = load_config(agent_config(tmp_path, tiny_bundle, str(video), "camera.roi = [40, 20, 240, 200]\nsampling.max_side = 120"))
    agent = Agent(cfg)
    real_predict = agent.classifier.predict

    def tiled_predict(image: np.ndarray) -> Prediction:
        assert image.shape[:2] == (200, 240), "predict sees the ROI picture"
        return replace(real_predict(image), passed=False, label="scratch", score=0.97, box=(100, 60, 64, 48))

    agent.classifier.predict = tiled_predict  # type: ignore[method-assign]
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while (agent.status_snapshot()["last_failure"] or {}).get("part_id") != 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        url = agent.status_snapshot()["operator_url"]
        status = json.loads(urllib.request.urlopen(url + "api/status", timeout=5).read())
        assert status["last_failure"]["part_id"] == 12 and status["last_failure"]["box"] == [140, 80, 64, 48]
        assert status["last_decision"]["box"] == [140, 80, 64, 48]
        with urllib.request.urlopen(url + "api/last-fail.jpg", timeout=5) as resp:
            shown = decode(resp.read())
        assert shown.shape == (200, 240, 3)
        assert_outline(shown, (100, 60, 64, 48))  # ROI picture pixels, drawn on the operator's copy
    finally:
        agent.stop()
        agent.join()
    with Buffer.open_readonly(tmp_path / "buffer.db") as buf:
        results = buf.tail(20)
        samples = buf.db.execute("SELECT result_seq, reason, width, height, jpeg FROM samples ORDER BY seq").fetchall()
    assert [r["box"] for r in results] == [[140, 80, 64, 48]] * 12
    assert {s[0] for s in samples} == {r["seq"] for r in results} and {s[1] for s in samples} == {"fail"}
    assert (samples[-1][2], samples[-1][3]) == (120, 100)
    assert_outline(decode(samples[-1][4]), (50, 30, 32, 24))  # the box at the sample's half scale
    tail = run_cli("edge", "results", "--config", str(tmp_path / "agent.toml"), "--tail", "1")
    assert tail.returncode == 0 and "box=140,80 64x48" in tail.stdout


def test_kill_9_never_loses_a_reported_decision(tmp_path: Path, tiny_bundle: Path) -> None:
    video = tmp_path / "long.avi"
    write_video(video, 400)
    cfg = agent_config(tmp_path, tiny_bundle, str(video), "camera.loop = true")
    rng = random.Random(7)
    reported: list[int] = []
    for _ in range(4):
        proc = start_agent(cfg)
        decisions = read_decisions(proc, rng.randint(5, 60))
        time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        # whatever it printed before dying was committed first
        out, _ = proc.communicate(timeout=10)
        rest = [json.loads(line) for line in out.splitlines() if line.strip()]
        reported += [d["seq"] for d in decisions + rest]
        got = rows(tmp_path / "buffer.db")
        seqs = [r[0] for r in got]
        assert len(seqs) == len(set(seqs))
        assert set(reported) <= set(seqs)
    assert len(reported) >= 4


def test_sigterm_stops_within_two_seconds_while_busy(tmp_path: Path, tiny_bundle: Path) -> None:
    video = tmp_path / "loop.avi"
    write_video(video, 50)
    cfg = agent_config(tmp_path, tiny_bundle, str(video), "camera.loop = true")
    proc = start_agent(cfg)
    assert len(read_decisions(proc, 20)) == 20
    elapsed = stop(proc)
    assert proc.returncode == 0
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    con = sqlite3.connect(tmp_path / "buffer.db")
    kinds = [k for (k,) in con.execute("SELECT kind FROM events ORDER BY seq")]
    assert kinds[-1] == "stop"


def test_camera_that_appears_later_is_retried_and_reported(tmp_path: Path, tiny_bundle: Path) -> None:
    video = tmp_path / "later.avi"
    cfg = agent_config(tmp_path, tiny_bundle, str(video))
    proc = start_agent(cfg)
    try:
        status = wait_status(cfg, lambda s: s["camera"]["state"] == "down" and s["camera"]["reconnects"] >= 1)
        assert proc.poll() is None, "the agent must not exit for a missing camera"
        assert status["camera"]["down_since"] is not None
        tmp = tmp_path / "tmp.avi"
        write_video(tmp, 10)
        os.replace(tmp, video)
        assert len(read_decisions(proc, 10, timeout=60)) == 10
    finally:
        stop(proc)
    con = sqlite3.connect(tmp_path / "buffer.db")
    kinds = {k for (k,) in con.execute("SELECT kind FROM events")}
    assert {"camera_down", "camera_up"} <= kinds


def test_bad_url_camera_keeps_agent_alive(tmp_path: Path, tiny_bundle: Path) -> None:
    from tests.helpers import free_port

    cfg = agent_config(tmp_path, tiny_bundle, f"rtsp://127.0.0.1:{free_port()}/cam")
    proc = start_agent(cfg)
    try:
        wait_status(cfg, lambda s: s["camera"]["state"] == "down")
        assert proc.poll() is None
    finally:
        assert stop(proc) < 2.5


@pytest.mark.parametrize("case", ["missing", "altered", "truncated_manifest", "no_model_dir"])
def test_bad_model_is_one_clear_error(tmp_path: Path, bundle_copy: Path, case: str) -> None:
    video = tmp_path / "v.avi"
    write_video(video, 3)
    model_dir = bundle_copy
    if case == "missing":
        (bundle_copy / "model.tflite").unlink()
        expect = "missing"
    elif case == "altered":
        data = bytearray((bundle_copy / "model.tflite").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (bundle_copy / "model.tflite").write_bytes(bytes(data))
        expect = "sha256"
    elif case == "truncated_manifest":
        (bundle_copy / "manifest.json").write_text('{"schema_version": 1, "name"')
        expect = "not valid JSON"
    else:
        model_dir = tmp_path / "empty-models"
        model_dir.mkdir()
        expect = "no model in"
    cfg = agent_config(tmp_path, model_dir, str(video))
    proc = subprocess.run([LINEWATCH, "edge", "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


# The one emulated piece of hardware: the disk's capacity. The agent process is real; this
# launcher applies SQLite's page limit (read from a file the test rewrites) to the agent's
# writes, so its buffer meets the genuine SQLITE_FULL ("database or disk is full") that a
# full filesystem gives, without root to mount a small one.
_SMALL_DISK = """
import contextlib, sys
from pathlib import Path
import edge.buffer

capacity = Path(sys.argv[1])
_write = edge.buffer.Buffer._write

@contextlib.contextmanager
def write_on_small_disk(self, what):
    if not self.readonly:
        self.db.conn.execute(f"PRAGMA max_page_count = {int(capacity.read_text())}")
    with _write(self, what) as conn:
        yield conn

edge.buffer.Buffer._write = write_on_small_disk
from edge.cli import main
sys.argv = ["linewatch", *sys.argv[2:]]
main()
"""


def test_full_disk_holds_decisions_reports_it_and_resumes(tmp_path: Path, tiny_bundle: Path) -> None:
    import queue
    import sys
    import threading

    frames = 240
    video = tmp_path / "parts.avi"
    write_video(video, frames)
    cfg = agent_config(tmp_path, tiny_bundle, str(video))
    capacity = tmp_path / "capacity"
    capacity.write_text("1000000")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SMALL_DISK, str(capacity), "edge", "run", "--config", str(cfg), "--echo"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    lines: queue.Queue[dict] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(json.loads(x)) for x in stdout], daemon=True).start()

    def drain(until: float) -> list[dict]:
        got: list[dict] = []
        while time.monotonic() < until:
            try:
                got.append(lines.get(timeout=max(0.01, until - time.monotonic())))
            except queue.Empty:
                break
        return got

    try:
        reported = [lines.get(timeout=60) for _ in range(10)]
        capacity.write_text("1")  # the disk is full: the file may not grow by one page
        status = wait_status(cfg, lambda s: s.get("buffer_error") is not None)
        assert "disk is full; free space" in status["buffer_error"]
        assert status["buffer_error_since"] is not None
        reported += drain(time.monotonic() + 0.5)  # decisions committed before the disk filled
        held = len(reported)
        assert held < frames, "the disk never filled"
        time.sleep(2.0)
        reported += drain(time.monotonic() + 0.1)
        assert len(reported) == held, "a decision was reported while it could not be committed"
        assert proc.poll() is None, "the agent must keep running on a full disk"
        live = json.loads((tmp_path / "buffer.status.json").read_text())
        assert live["decisions_waiting"] <= 32  # bounded: a file source waits behind it
        assert live["camera"]["dropped"] == 0

        capacity.write_text("1000000")  # space returns
        deadline = time.monotonic() + 60
        while len(reported) < frames and time.monotonic() < deadline:
            reported += drain(time.monotonic() + 1.0)
        assert len(reported) == frames
        wait_status(cfg, lambda s: s.get("buffer_error") is None)
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert "disk is full; free space on the device" in proc.stderr_text  # type: ignore[attr-defined]
    got = rows(tmp_path / "buffer.db")
    assert [r[1] for r in got] == list(range(1, frames + 1)), "every frame once, in order, none lost"
    assert [d["seq"] for d in reported] == [r[0] for r in got]
    con = sqlite3.connect(tmp_path / "buffer.db")
    (detail,) = con.execute("SELECT detail FROM events WHERE kind = 'buffer_unwritable'").fetchone()
    assert json.loads(detail)["seconds"] >= 2.0
    assert "disk is full" in json.loads(detail)["error"]
