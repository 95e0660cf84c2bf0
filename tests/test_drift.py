"""Drift on the box (issue 21): the tests, the hysteresis, the agent on shifted videos, the cloud."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cloud.drift_cli import parse_when
from edge.agent import Agent, Sampler, drift_reason
from edge.buffer import Buffer, SampleRecord, sample_reason_ok
from edge.config import load_config
from edge.drift import (
    DriftMonitor,
    DriftSettings,
    banner,
    describe,
    frame_stats,
    ks_statistic,
    proportion_z,
    psi,
)
from edge.inference import Classifier, Prediction
from tests.conftest import LINEWATCH, Broker, run_cli, wait_status
from tests.helpers import PREFIX, Proc, all_synced, cloud_query, wait_until

# Small windows so a test runs in seconds: learn 40 parts, compare the last 30 every 5,
# two checks out of band to rise, three in band to fall.
SMALL = DriftSettings(baseline_parts=40, window_parts=30, check_every=5, persist_checks=2, clear_checks=3)
SMALL_TOML = "[drift]\nbaseline_parts = 40\nwindow_parts = 30\ncheck_every = 5\npersist_checks = 2\nclear_checks = 3\n"
REFERENCE = {"input": {"pixel_mean": 110.0, "histogram": {"fraction": [1 / 16] * 16}}}


def part_frames(n: int, seed: int = 0, size: tuple[int, int] = (160, 120)) -> list[np.ndarray]:
    """Parts of varying brightness with fine texture, as a camera might see them (BGR)."""
    rng = np.random.default_rng(seed)
    w, h = size
    frames = []
    for _ in range(n):
        img = np.full((h, w), rng.uniform(90, 130), np.float32)
        img += rng.normal(0, 12, (h, w)).astype(np.float32)
        cv2.rectangle(img, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), float(rng.uniform(150, 190)), -1)
        frames.append(cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    return frames


def darker(frame: np.ndarray) -> np.ndarray:
    return cv2.convertScaleAbs(frame, alpha=0.7)


def monitor(reference: dict[str, Any] | None = None, settings: DriftSettings = SMALL) -> DriftMonitor:
    return DriftMonitor(settings, model_version="m1", model_sha256="a" * 64, threshold=0.5,
                        reference=REFERENCE if reference is None else reference)


def feed(m: DriftMonitor, frames: list[np.ndarray], rng: np.random.Generator) -> list[dict[str, Any]]:
    states = []
    for f in frames:
        m.observe(f, float(rng.uniform(0, 0.3)), True)
        states += [e for kind, e in m.take_events() if kind == "drift_state"]
    return states


def test_tests_measure_what_they_say() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(0, 1, 300)
    assert ks_statistic(a, b) < 0.15 and ks_statistic(a, a + 10) == 1.0
    h = np.array([10, 20, 30, 40])
    assert psi(h, h) == pytest.approx(0.0) and psi(h[::-1], h) > 0.25
    assert abs(proportion_z(10, 100, 10, 100)) < 1e-9 and proportion_z(60, 100, 10, 100) > 5


def test_states_rise_only_after_persistence_and_clear_after_it() -> None:
    rng = np.random.default_rng(0)
    m = monitor()
    assert feed(m, part_frames(40, seed=1), rng) == [] and m.snapshot()["checks"] == "on"
    assert m.take_baseline_record() is not None, "a learned baseline is handed to the buffer once"
    # one odd, dark part among usual ones raises nothing
    usual = part_frames(60, seed=2)
    assert feed(m, [*usual[:20], darker(usual[20]), *usual[21:]], rng) == []
    assert m.snapshot()["state"] == "ok"
    # the lamp loses 30 %: drift, with an operator's reason
    changes = feed(m, [darker(f) for f in part_frames(40, seed=3)], rng)
    assert [c["state"] for c in changes][-1] == "drift", changes
    snap = m.snapshot()
    assert snap["state"] == "drift" and "brightness" in snap["out_of_band"]
    assert snap["measures"]["brightness"]["direction"] == -1
    assert any("darker than usual: check the lighting" in r for r in snap["reasons"])
    assert "darker" in (banner(snap) or "") and describe(snap).startswith("drift: ")
    assert "blurrier" not in " ".join(snap["reasons"]), "a dimmer lamp is not a blur"
    # the lamp is fixed: back to ok once the window holds usual parts again
    changes = feed(m, part_frames(60, seed=4), rng)
    assert changes and changes[-1]["state"] == "ok" and m.snapshot()["out_of_band"] == []


def test_blur_reads_as_blur() -> None:
    rng = np.random.default_rng(0)
    m = monitor()
    feed(m, part_frames(40, seed=1), rng)
    feed(m, [cv2.GaussianBlur(f, (0, 0), 2.0) for f in part_frames(50, seed=5)], rng)
    snap = m.snapshot()
    assert snap["state"] == "drift" and "sharpness" in snap["out_of_band"], snap
    assert any("blurrier than usual: clean the lens" in r for r in snap["reasons"])


def test_no_reference_or_disabled_means_checks_off_and_said() -> None:
    m = monitor(reference={})
    m.observe(part_frames(1)[0], 0.1, True)
    snap = m.snapshot()
    assert snap["checks"] == "off" and snap["state"] == "ok" and "no reference statistics" in snap["note"]
    assert "no reference statistics" in (banner(snap) or "") and describe(snap).startswith("off: ")
    off = monitor(settings=DriftSettings(enabled=False))
    assert off.snapshot()["checks"] == "off" and "drift.enabled = false" in off.snapshot()["note"]


def test_baseline_restores_for_the_same_model_only() -> None:
    rng = np.random.default_rng(0)
    m = monitor()
    feed(m, part_frames(40, seed=1), rng)
    record = m.take_baseline_record()
    again = monitor()
    assert again.restore(record) and again.snapshot()["checks"] == "on"
    other = DriftMonitor(SMALL, model_version="m2", model_sha256="b" * 64, threshold=0.5, reference=REFERENCE)
    assert not other.restore(record) and other.snapshot()["checks"] == "baseline"
    assert not monitor().restore("{not json") and not monitor().restore(None)


def test_reset_at_a_new_model_restarts_statistics_without_a_drift() -> None:
    rng = np.random.default_rng(0)
    m = monitor()
    feed(m, part_frames(40, seed=1), rng)
    feed(m, [darker(f) for f in part_frames(40, seed=3)], rng)
    assert m.snapshot()["state"] == "drift"
    m.reset(model_version="m2", model_sha256="b" * 64, threshold=0.4, reference=REFERENCE, why="model switched to m2")
    (kind, event), = m.take_events()
    assert kind == "drift_state" and event["state"] == "ok" and event["why"] == "model switched to m2"
    snap = m.snapshot()
    assert snap["state"] == "ok" and snap["checks"] == "baseline" and snap["model_version"] == "m2"
    # the new model learns the (dark) line as its usual: no drift is declared after it
    assert feed(m, [darker(f) for f in part_frames(120, seed=6)], rng) == []


def _baseline_values(m: DriftMonitor) -> dict[str, Any]:
    record = json.loads(m.take_baseline_record() or "{}")
    return {"values": record["values"], "histograms": record["histograms"]}


def test_batched_measures_are_each_frames_own_whenever_they_run() -> None:
    """Pixels copied per part and measured a batch at a time give each frame's own measures
    (frame_stats on that frame alone), in order: measured in observe, or later in update
    (deferred, as the agent runs it), across a change of frame size and of colour."""
    frames = [*part_frames(13, seed=7), *part_frames(9, seed=8, size=(200, 150)),
              *[cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in part_frames(8, seed=9)]]
    settings = DriftSettings(baseline_parts=len(frames), window_parts=10, check_every=4)
    scores = np.random.default_rng(0).uniform(0, 1, len(frames))
    inline, deferred = monitor(settings=settings), DriftMonitor(
        settings, model_version="m1", model_sha256="a" * 64, threshold=0.5, reference=REFERENCE, deferred=True)
    for i, (f, score) in enumerate(zip(frames, scores, strict=True)):
        inline.observe(f, float(score), score < 0.5)
        deferred.observe(f, float(score), score < 0.5)
        if i % 3 == 0:
            deferred.update()  # the writer comes by now and then; a full batch is measured in observe
    assert inline.snapshot()["checks"] == "on", "the baseline ends at its last part"
    deferred.update()
    got = _baseline_values(inline)
    assert _baseline_values(deferred) == got
    for i, f in enumerate(frames):
        fs = frame_stats(f)
        assert got["values"]["brightness"][i] == round(fs.brightness, 4)
        assert got["values"]["contrast"][i] == round(fs.contrast, 4)
        assert got["values"]["sharpness"][i] == round(float(np.log1p(fs.sharpness)), 4)
        assert got["values"]["score"][i] == round(float(scores[i]), 4)
        assert got["values"]["failed"][i] == float(scores[i] >= 0.5)
        assert got["histograms"][i] == [int(v) for v in fs.histogram]


def test_parts_waiting_at_a_model_swap_are_not_the_new_models() -> None:
    settings = DriftSettings(baseline_parts=20, window_parts=10, check_every=8)
    m = DriftMonitor(settings, model_version="m1", model_sha256="a" * 64, threshold=0.5, reference=REFERENCE, deferred=True)
    for f in part_frames(5, seed=1):
        m.observe(darker(f), 0.1, True)  # waiting in the batch, not yet measured
    m.reset(model_version="m2", model_sha256="b" * 64, threshold=0.5, reference=REFERENCE)
    frames = part_frames(20, seed=2)
    for f in frames:
        m.observe(f, 0.1, True)
    m.update()
    assert m.snapshot()["checks"] == "on"
    assert _baseline_values(m)["values"]["brightness"] == [round(frame_stats(f).brightness, 4) for f in frames]


def _pred(score: float, passed: bool) -> Prediction:
    return Prediction("ok" if passed else "scratch", score, passed, (1 - score, score), (0, 0), 0.1, 0.1)


def test_drift_samples_are_tagged_budgeted_and_accepted_by_the_buffer(tmp_path: Path, write_config: Any) -> None:
    cfg = load_config(write_config(
        'device_id = "d"\ncamera.source = "x.avi"\nmodel.path = "m"\nbuffer.path = "b.db"\n'
        "[sampling]\nreservoir_per_hour = 0\n[drift]\nsamples_per_hour = 6\n"
    ))
    sampler = Sampler(cfg, lambda: 0.5, seed=1)
    out = ("brightness", "histogram")
    got = [sampler.reason(_pred(0.9, False), 100.0, out) for _ in range(5)]
    assert got[:2] == ["drift_fail:brightness+histogram"] * 2 and got[2:] == ["fail"] * 3, "a third of 6 each, then normal"
    assert sampler.reason(_pred(0.55, True), 100.0, out) == "drift_near_threshold:brightness+histogram"
    assert sampler.reason(_pred(0.55, True), 100.0, ()) == "low_confidence", "normal again once in band"
    assert len(drift_reason("random", tuple(["brightness"] * 20))) == 64
    assert sample_reason_ok("drift_random:sharpness") and sample_reason_ok("fail")
    assert not sample_reason_ok("drift_whatever:x") and not sample_reason_ok("drift_fail:" + "x" * 60)
    jpeg = cv2.imencode(".jpg", part_frames(1)[0])[1].tobytes()
    with Buffer(tmp_path / "b.db", max_bytes=10_000_000, device_id="d") as buf:
        buf.record_results([], prior_samples=[
            SampleRecord(1.0, "drift_random:brightness", "ok", 0.1, 160, 120, jpeg),
            SampleRecord(1.0, "garbage", "ok", 0.1, 160, 120, jpeg),  # not kept, and not fatal
        ])
        assert [r[0] for r in buf.db.execute("SELECT reason FROM samples")] == ["drift_random:brightness"]
        assert buf.samples_refused == 1


def test_parse_when_takes_seconds_iso_and_ages() -> None:
    assert parse_when("1765100000") == 1765100000.0
    assert parse_when("2026-12-07T00:00") == parse_when("2026-12-07T00:00+00:00")
    assert parse_when("2026-12-07T00:00Z") == parse_when("2026-12-07T00:00+00:00")
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(Exception, match="is not a time"):
        parse_when("yesterday-ish")


# -- the agent on videos made here --------------------------------------------------------------


def write_parts_video(path: Path, n: int, dark_from: int | None = None) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25, (160, 120))
    assert writer.isOpened()
    for i, f in enumerate(part_frames(n, seed=7)):
        writer.write(darker(f) if dark_from is not None and i >= dark_from else f)
    writer.release()


def test_agent_declares_drift_syncs_it_and_exports_tagged_samples(
    tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc], tiny_bundle: Path
) -> None:
    cloud_toml, _ = cloud
    video = tmp_path / "parts.avi"
    write_parts_video(video, 180, dark_from=70)
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'device_id = "cam-d1"\ncamera.source = "{video}"\nmodel.path = "{tiny_bundle}"\nbuffer.path = "buffer.db"\n'
        f'operator.port = 0\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\n'
        f"status_interval_s = 0.5\nack_timeout_s = 1.0\n{SMALL_TOML}samples_per_hour = 30\n"
    )
    proc = Proc([LINEWATCH, "edge", "run", "--config", str(agent)], tmp_path / "agent.log")
    try:
        status = wait_status(agent, lambda s: (s.get("drift") or {}).get("state") == "drift")
        drift = status["drift"]
        assert "brightness" in drift["out_of_band"] and drift["checks"] == "on"
        human = run_cli("edge", "status", "--config", str(agent))
        assert "drift: drift: images darker than usual: check the lighting" in human.stdout, human.stdout
        live = json.loads((tmp_path / "buffer.status.json").read_text())
        import urllib.request

        page = urllib.request.urlopen(live["operator_url"], timeout=5).read().decode()
        assert 'id="drift"' in page
        # the state change reached the cloud as an event, the state as part of the status
        wait_until(lambda: cloud_query(cloud_toml, "SELECT count(*) FROM events WHERE device_id = 'cam-d1'"
                                       " AND kind = 'drift_state'")[0][0] >= 1, 30, "drift events in the cloud")
        fleet = wait_until(lambda: (f := _cloud_json(cloud_toml, "fleet", "--json"))
                           and f[0].get("drift", {}).get("state") == "drift" and f, 30, "drift in the fleet")
        assert fleet[0]["device_id"] == "cam-d1"
        history = _cloud_json(cloud_toml, "drift", "--device", "cam-d1", "--json")
        assert history[-1]["state"] == "drift" and any("darker" in r for r in history[-1]["reasons"])
        table = run_cli("cloud", "fleet", "--config", str(cloud_toml))
        assert "drift" in table.stdout.splitlines()[1], table.stdout
        # tagged drift samples, exported into the training layout
        wait_until(lambda: all_synced(agent), 30, "every result, event and sample in the cloud")
        listed = _cloud_json(cloud_toml, "samples", "list", "--device", "cam-d1", "--reason", "drift", "--since", "1h", "--json")
        assert listed and all(r["reason"].split(":")[0] in ("drift_fail", "drift_near_threshold", "drift_random")
                              for r in listed)
        assert any("brightness" in r["reason"] for r in listed), [r["reason"] for r in listed]
        assert _cloud_json(cloud_toml, "samples", "list", "--reason", "drift", "--until", "2000-01-01", "--json") == []
        out = tmp_path / "to-label"
        exported = run_cli("cloud", "samples", "export", str(out), "--config", str(cloud_toml), "--reason", "drift")
        assert exported.returncode == 0, exported.stderr
        files = sorted((out / "unlabelled").glob("*.jpg"))
        assert len(files) == len(listed) >= 1 and cv2.imread(str(files[0])) is not None
        with open(out / "linewatch-samples.csv", newline="") as f:
            index = list(csv.DictReader(f))
        assert {r["reason"] for r in index} == {r["reason"] for r in listed}
        by_class = run_cli("cloud", "samples", "export", str(tmp_path / "by-class"), "--config", str(cloud_toml),
                           "--reason", "drift", "--by-prediction")
        assert by_class.returncode == 0 and not (tmp_path / "by-class" / "unlabelled").exists()
        bad = run_cli("cloud", "samples", "list", "--config", str(cloud_toml), "--since", "last tuesday")
        assert bad.returncode != 0 and "is not a time" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        code = proc.term(15)
    assert code == 0, proc.output()


def _cloud_json(cloud_toml: Path, *args: str) -> Any:
    out = run_cli("cloud", *args, "--config", str(cloud_toml))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _agent_config(tmp_path: Path, bundle: Path, video: Path) -> Any:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "cam"\ncamera.source = "{video}"\nmodel.path = "{bundle}"\nbuffer.path = "{tmp_path / "b.db"}"\n'
        f"mqtt.enabled = false\noperator.enabled = false\n{SMALL_TOML}"
    )
    return load_config(path)


def _run_until(agent: Agent, pred: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = agent.drift.snapshot()
        if pred(snap):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"drift never matched: {agent.drift.snapshot()}")


def test_unchanged_line_stays_ok_and_a_model_swap_restarts_statistics(tmp_path: Path, v1: Path, v2: Path) -> None:
    video = tmp_path / "parts.avi"
    write_parts_video(video, 160)
    agent = Agent(_agent_config(tmp_path, v1, video))
    agent.start()
    try:
        _run_until(agent, lambda s: s["checks"] == "on" and s["window_parts"] >= 30)
        wait_until(lambda: agent.counts["results"] >= 150, 30, "the video to be decided")
        assert agent.drift.snapshot()["state"] == "ok"
        agent.swap_model(Classifier(v2))
        snap = _run_until(agent, lambda s: s["model_version"] == "tiny-2")
        assert snap["checks"] in ("baseline", "on") and snap["state"] == "ok"
    finally:
        agent.stop()
        agent.join(5)
    with Buffer.open_readonly(tmp_path / "b.db") as buf:
        kinds = [r[0] for r in buf.db.execute("SELECT kind FROM events ORDER BY seq")]
        assert "model_switched" in kinds and "drift_state" not in kinds, kinds
        assert json.loads(buf.meta_get("drift_baseline") or "{}")["model_version"] in ("tiny-1", "tiny-2")


def test_old_bundle_without_reference_runs_with_checks_off(tmp_path: Path, tiny_bundle: Path) -> None:
    old = tmp_path / "old-bundle"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("reference", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    video = tmp_path / "parts.avi"
    write_parts_video(video, 60, dark_from=20)
    cfg = _agent_config(tmp_path, old, video)
    agent = Agent(cfg)
    agent.start()
    try:
        wait_until(lambda: agent.counts["results"] >= 60, 30, "the video to be decided")
    finally:
        agent.stop()
        agent.join(5)
    snap = agent.status_snapshot()["drift"]
    assert snap["checks"] == "off" and snap["state"] == "ok" and "no reference statistics" in snap["note"]
    status = json.loads(run_cli("edge", "status", "--config", str(tmp_path / "agent.toml"), "--json").stdout)
    assert status["drift"]["checks"] == "off" and status["results"] == 60
