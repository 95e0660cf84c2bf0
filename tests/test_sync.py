"""Store-and-forward sync against a real Mosquitto and a real ingest process.

The device side is a real process running edge.sync.SyncClient over a buffer the test
fills (tests/helpers.py, ``start_device``); the cloud side is ``linewatch cloud serve`` as a
subprocess (the ``cloud`` fixture in conftest.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge import sync as sync_mod
from edge.buffer import Buffer, ResultRecord
from edge.config import load_config
from edge.protocol import COLUMNS, encode_payload
from edge.sync import MARK_CHUNK_ROWS, SyncClient, _split
from tests.conftest import LINEWATCH, Broker
from tests.helpers import (
    PREFIX,
    Proc,
    all_synced,
    cloud_query,
    cloud_seqs,
    fill_buffer,
    start_device,
    unsynced,
    wait_until,
    write_agent_config,
)

# -- helpers ---------------------------------------------------------------------------------------


def retained_status(broker: Broker, device_id: str, timeout: float = 15) -> dict[str, Any]:
    """The retained status message of a device, read with a fresh subscriber (a loaded CI box
    has taken over 5 s to see the first one)."""
    got: list[dict[str, Any]] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{os.getpid()}-{random.random()}", protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload)) if m.retain and m.payload else None
    c.connect(broker.host, broker.port)
    c.subscribe(f"{PREFIX}/devices/{device_id}/status", qos=1)
    c.loop_start()
    try:
        wait_until(lambda: got, timeout, f"retained status of {device_id}")
    finally:
        c.loop_stop()
        c.disconnect()
    return got[-1]


# -- tests -------------------------------------------------------------------------------------


def test_backlog_reaches_cloud_exactly_once_in_order(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-a", batch_rows=200)
    big = os.urandom(150_000)  # three chunks
    small = os.urandom(2_000)
    fill_buffer(agent, 1234, samples=[big, small], events=3)
    dev = start_device(agent, model_version="v7")
    wait_until(lambda: all_synced(agent), 30, "the backlog to be acked")
    assert cloud_seqs(cloud_toml, "cam-a") == list(range(1, 1235))
    assert cloud_seqs(cloud_toml, "cam-a", "events")  # at least the three camera events
    rows = cloud_query(cloud_toml, "SELECT seq, path, bytes, label, reason FROM samples WHERE device_id = 'cam-a' ORDER BY seq")
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [(1, 150_000, "scratch", "fail"), (2, 2_000, "scratch", "fail")]
    files = {r[0]: (cloud_toml.parent / "cloud-data" / "samples" / r[1]).read_bytes() for r in rows}
    assert files == {1: big, 2: small}
    assert cloud_query(cloud_toml, "SELECT count(*) FROM sample_chunks") == [(0,)]
    first = cloud_query(cloud_toml, "SELECT part_id, label, passed, score, model_version FROM results WHERE device_id='cam-a' AND seq=1")
    assert first == [(0, "scratch", 0, 0.9, "m1")]
    assert dev.term() == 0
    status = retained_status(broker, "cam-a")
    assert status["state"] == "offline" and status["reason"] == "stopped" and status["unsynced"] == 0
    assert status["model_version"] == "v7"


def test_result_boxes_survive_buffer_sync_and_cloud_store(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    """A tiled model's box arrives intact; rows without one still sync, in version 1 batches."""
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-b", batch_rows=50)
    cfg = load_config(agent)
    now = time.time()
    boxes: dict[int, tuple[int, int, int, int] | None] = {}
    with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, device_id=cfg.device_id) as buf:
        whole = [ResultRecord(now, "cam-b", i, "m1", "ok", 0.1, True) for i in range(100)]  # whole-frame model
        boxes.update(dict.fromkeys(buf.record_results(whole)))
        tiled = [
            ResultRecord(now, "cam-b", i, "t1", "scratch" if i % 2 else "ok", 0.9 if i % 2 else 0.2, not i % 2,
                         box=(16 * (i % 40), 8, 128, 96) if i % 2 else None)  # fmt: skip
            for i in range(100, 200)
        ]
        boxes.update(zip(buf.record_results(tiled), (r.box for r in tiled), strict=True))
    seen: list[dict[str, Any]] = []  # every results batch on the wire
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{os.getpid()}", protocol=mqtt.MQTTv5)
    watcher.on_message = lambda _c, _u, m: seen.append(json.loads(m.payload))
    watcher.connect(broker.host, broker.port)
    watcher.subscribe(f"{PREFIX}/devices/cam-b/results", qos=1)
    watcher.loop_start()
    try:
        time.sleep(0.3)  # the subscription is in place before the device sends
        dev = start_device(agent)
        wait_until(lambda: all_synced(agent), 30, "the results to be acked")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    assert dev.term() == 0
    stored = cloud_query(cloud_toml, "SELECT seq, box_x, box_y, box_w, box_h FROM results WHERE device_id = 'cam-b' ORDER BY seq")
    assert [r[0] for r in stored] == list(boxes)
    assert {r[0]: (None if r[1] is None else tuple(r[1:])) for r in stored} == boxes
    by_first = {b["first_seq"]: b for b in seen}
    assert by_first[1]["v"] == by_first[51]["v"] == 1 and "box" not in by_first[1]["cols"]
    assert by_first[101]["v"] == by_first[151]["v"] == 2
    assert by_first[101]["cols"]["box"][:2] == [None, [16 * 21, 8, 128, 96]]
    listed = subprocess.run(
        [LINEWATCH, "cloud", "results", "--device", "cam-b", "--config", str(cloud_toml), "--after", "100", "--limit", "2", "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [r["box"] for r in json.loads(listed.stdout)] == [None, [336, 8, 128, 96]]


def test_broker_outage_then_restart_delivers_everything_once(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, ingest = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-b", batch_rows=100)
    fill_buffer(agent, 300)
    dev = start_device(agent)
    wait_until(lambda: all_synced(agent), 20, "the first rows to be acked")
    broker.stop()
    # The line keeps running while the network is down: rows pile up in the buffer.
    fill_buffer(agent, 500, start_part=300)
    time.sleep(1.5)
    assert unsynced(agent)["results"] == 500
    assert dev.alive() and ingest.alive()
    broker.start()
    wait_until(lambda: all_synced(agent), 30, "the outage backlog to be acked")
    seqs = cloud_seqs(cloud_toml, "cam-b")
    assert sorted(seqs) == list(range(1, 801)) and len(seqs) == len(set(seqs))
    parts = [r[0] for r in cloud_query(cloud_toml, "SELECT part_id FROM results WHERE device_id = 'cam-b' ORDER BY seq")]
    assert parts == list(range(800)), "in seq order per device"
    assert cloud_query(cloud_toml, "SELECT results FROM devices WHERE device_id = 'cam-b'") == [(800,)]
    dev.term()


def test_sync_process_killed_repeatedly_during_drain(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, _ = cloud
    # Small batches and one in flight: the drain takes long enough to be interrupted.
    agent = write_agent_config(tmp_path / "dev", broker, "cam-c", batch_rows=10, max_inflight=1)
    n = 600
    fill_buffer(agent, n, samples=[os.urandom(70_000)], events=2)
    left = n
    for _ in range(4):
        dev = start_device(agent)
        # Kill it as soon as it has made progress: in the middle of the drain, acks in flight.
        wait_until(lambda: unsynced(agent)["results"] < left, 20, "drain progress", interval=0.01)  # noqa: B023
        dev.kill9()
        now_left = unsynced(agent)["results"]
        assert 0 < now_left < left, "killed while rows were still draining"
        left = now_left
    dev = start_device(agent)
    wait_until(lambda: all_synced(agent), 40, "the drain to finish after the kills")
    seqs = cloud_seqs(cloud_toml, "cam-c")
    assert sorted(seqs) == list(range(1, n + 1)) and len(seqs) == n
    assert cloud_query(cloud_toml, "SELECT results, samples FROM devices WHERE device_id = 'cam-c'") == [(n, 1)]
    dev.term()


def test_evictions_show_as_gaps_in_the_cloud(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-d", max_bytes=256 * 1024)
    # Offline: far more than the 256 KiB budget holds, so unsynced rows are evicted.
    fill_buffer(agent, 8000)
    cfg = load_config(agent)
    with Buffer.open_readonly(cfg.buffer.path) as buf:
        evicted = buf.counters()["evicted_unsynced_pass"] + buf.counters()["evicted_unsynced_fail"]
        kept = buf.unsynced_counts()["results"]
        gap_rows = buf.pending_gaps()
    assert evicted > 0 and gap_rows and kept + evicted == 8000
    dev = start_device(agent)
    wait_until(lambda: all_synced(agent), 30, "rows and gaps to be acked")
    gaps = cloud_query(cloud_toml, "SELECT table_name, first_seq, last_seq, count FROM gaps WHERE device_id = 'cam-d' ORDER BY seq")
    assert [g[0] for g in gaps] == ["results"] * len(gap_rows)
    assert sum(g[3] for g in gaps) == evicted
    stored = set(cloud_seqs(cloud_toml, "cam-d"))
    assert len(stored) == kept
    missing = set(range(1, 8001)) - stored
    covered = {s for _, a, b, _c in gaps for s in range(a, b + 1)}
    assert missing <= covered, "every hole in the cloud is explained by a gap record"
    assert cloud_query(cloud_toml, "SELECT gaps, evicted FROM devices WHERE device_id = 'cam-d'") == [(len(gaps), evicted)]
    dev.term()


def test_stop_is_prompt_and_leaves_a_retained_offline_status(tmp_path: Path, broker: Broker) -> None:
    agent = write_agent_config(tmp_path / "dev", broker, "cam-e")
    fill_buffer(agent, 5)  # no ingest: nothing is acked, the rows stay unsynced
    client = SyncClient(load_config(agent), status=lambda: {"model_version": "m9", "camera": {"state": "up"}})
    client.start()
    wait_until(lambda: client.connected, 10, "the connect")
    online = retained_status(broker, "cam-e")
    assert online["state"] == "online" and online["unsynced"] == 5 and online["camera"] == {"state": "up"}
    assert online["groups"] == ["line1"] and online["v"] == 1
    t0 = time.monotonic()
    client.stop()
    client.join(2)
    assert not client.is_alive() and time.monotonic() - t0 < 1.5
    offline = retained_status(broker, "cam-e")
    assert offline["state"] == "offline" and offline["reason"] == "stopped" and offline["unsynced"] == 5
    assert unsynced(agent)["results"] == 5, "no ack, no mark: rows stay in the buffer"


def test_unreachable_broker_and_refused_connect(tmp_path: Path, broker: Broker) -> None:
    # Mosquitto refusing anonymous clients answers CONNACK "not authorized".
    broker.stop()
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    broker.start()
    agent = write_agent_config(tmp_path / "dev", broker, "cam-f")
    client = SyncClient(load_config(agent), reconnect_min_s=0.1, reconnect_max_s=0.4)
    client.start()
    wait_until(lambda: client.link is not None and client.link.connects == 0 and client.link.last_error
               and "refused" in client.link.last_error, 10, "a refused connect")  # fmt: skip
    time.sleep(0.8)
    assert not client.connected and client.link is not None and client.link.connects == 0
    assert client.link.attempts >= 2, "it keeps retrying with backoff"
    # Nothing listening at all: stop still ends the thread within a second.
    broker.stop()
    time.sleep(0.3)
    t0 = time.monotonic()
    client.stop()
    client.join(2)
    assert not client.is_alive() and time.monotonic() - t0 < 1.5


def test_stop_is_not_held_up_by_a_hanging_connect(tmp_path: Path, broker: Broker) -> None:
    # A non-routable address: the TCP connect hangs (or fails at once without a route).
    agent = write_agent_config(tmp_path / "dev", broker, "cam-h", host="10.255.255.1")
    client = SyncClient(load_config(agent))
    client.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    client.stop()
    client.join(2)
    assert not client.is_alive() and time.monotonic() - t0 < 1.5
    assert not client.connected


def test_status_runs_while_acks_flow_and_inspection_is_not_blocked(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    """The agent's writer keeps committing at full speed while sync drains the same file."""
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-g", batch_rows=50)
    cfg = load_config(agent)
    client = SyncClient(cfg, status=lambda: {"model_version": "m1"})
    stop = threading.Event()
    worst: list[float] = []

    def writer() -> None:
        with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, device_id=cfg.device_id) as buf:
            i = 0
            while not stop.is_set() and i < 600:
                t = time.perf_counter()
                buf.record_result(ResultRecord(time.time(), cfg.device_id, i, "m1", "ok", 0.1, True))
                worst.append(time.perf_counter() - t)
                i += 1

    fill_buffer(agent, 1)
    client.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join(30)
    wait_until(lambda: all_synced(agent), 20, "everything acked")
    client.stop()
    client.join(2)
    assert sorted(cloud_seqs(cloud_toml, "cam-g")) == list(range(1, 602))
    assert client.stats.rows_acked["results"] == 601
    assert len(worst) == 600, "every decision was committed while sync ran"


@pytest.mark.slow
def test_real_agent_syncs_every_decision(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc], tiny_bundle: Path) -> None:
    """`linewatch edge run` with the tiny real model: every decision reaches the cloud once."""
    import cv2
    import numpy as np

    cloud_toml, _ = cloud
    video = tmp_path / "parts.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"MJPG"), 25, (160, 120))
    rng = np.random.default_rng(0)
    for i in range(40):
        img = np.full((120, 160, 3), 120, np.uint8) + rng.integers(0, 20, (120, 160, 3), dtype=np.uint8)
        if i % 3 == 0:
            cv2.line(img, (10, 10), (150, 100), (30, 30, 30), 2)
        writer.write(img)
    writer.release()
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'device_id = "cam-real"\ngroups = ["line1"]\ncamera.source = "{video}"\nmodel.path = "{tiny_bundle}"\n'
        f'buffer.path = "buffer.db"\noperator.enabled = false\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'topic_prefix = "{PREFIX}"\nstatus_interval_s = 0.5\nack_timeout_s = 1.0\n'
    )
    proc = Proc([LINEWATCH, "edge", "run", "--config", str(agent)], tmp_path / "agent.log")
    try:
        wait_until(lambda: len(cloud_seqs(cloud_toml, "cam-real")) >= 40, 60, "40 decisions in the cloud")
        wait_until(lambda: all_synced(agent), 20, "the agent's buffer to be synced")
        seqs = cloud_seqs(cloud_toml, "cam-real")
        assert sorted(seqs) == list(range(1, 41)) and len(seqs) == 40
        wait_until(lambda: cloud_query(cloud_toml, "SELECT model_version, reported_state FROM devices WHERE device_id = 'cam-real'")
                   == [("tiny-1", "online")], 10, "the agent's status")  # fmt: skip
        # The sync process reports the agent's status file, rewritten on camera changes.
        wait_until(lambda: retained_status(broker, "cam-real")["camera"]["state"] in ("up", "ended"), 10, "camera state")
        assert retained_status(broker, "cam-real")["runtime"]
    finally:
        code = proc.term(15)
    assert code == 0, proc.output()
    assert retained_status(broker, "cam-real")["state"] == "offline"


def _running(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
def test_sync_process_restarts_after_a_crash_and_ends_with_its_agent(tmp_path: Path, broker: Broker, tiny_bundle: Path) -> None:
    """The drain runs in a child of the agent: a dead child is restarted; a dead agent takes it along."""
    images = tmp_path / "frames"
    images.mkdir()
    import cv2
    import numpy as np

    for i in range(5):
        cv2.imwrite(str(images / f"{i}.png"), np.full((60, 80), 100 + i, np.uint8))
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'device_id = "cam-sp"\ncamera.source = "{images}"\ncamera.fps = 5\ncamera.loop = true\n'
        f'model.path = "{tiny_bundle}"\nbuffer.path = "buffer.db"\noperator.enabled = false\n[mqtt]\n'
        f'host = "{broker.host}"\nport = {broker.port}\ntopic_prefix = "{PREFIX}"\nstatus_interval_s = 0.3\n'
    )
    proc = Proc([LINEWATCH, "edge", "run", "--config", str(agent)], tmp_path / "agent.log")

    def status() -> dict[str, Any]:
        try:
            return retained_status(broker, "cam-sp", timeout=1)
        except pytest.fail.Exception:  # nothing retained yet
            return {}

    try:
        first = wait_until(lambda: status().get("sync_pid"), 30, "a status from the sync process")
        assert first != proc.proc.pid and _running(first)
        os.kill(first, signal.SIGKILL)
        second = wait_until(lambda: (status().get("sync_pid") or first) != first and status()["sync_pid"], 20, "a restarted sync process")
        # The status file is rewritten every second: wait for the one after the restart.
        live = wait_until(lambda: (d := json.loads((tmp_path / "buffer.status.json").read_text()))["sync_process"]["pid"] == second and d,
                          10, "the status file to show the new sync process")  # fmt: skip
        assert live["sync_process"]["restarts"] == 1 and live["camera"]["state"] == "up"
        shown = subprocess.run([LINEWATCH, "edge", "status", "--config", str(agent), "--json"], capture_output=True, text=True, timeout=60)
        assert json.loads(shown.stdout)["sync_process"] == {"pid": second, "alive": True, "restarts": 1}, shown.stdout
        proc.kill9()
        wait_until(lambda: not _running(second), 5, "the sync process to end with its agent")
        # It vanished without a goodbye, so the broker published the last will.
        final = wait_until(lambda: (s := status()).get("state") == "offline" and s, 10, "the last will")
        assert final["reason"] == "lost"
    finally:
        proc.kill9()


def test_split_cuts_acked_ranges_into_mark_chunks() -> None:
    assert _split([(1, 1000)], 500) == ([(1, 500)], [(501, 1000)])
    assert _split([(1, 500)], 500) == ([(1, 500)], [])
    assert _split([(1, 10), (20, 29), (40, 1000)], 25) == ([(1, 10), (20, 29), (40, 44)], [(45, 1000)])
    assert _split([(5, 6)], 500) == ([(5, 6)], [])


def test_idle_poll_skips_the_synced_history(tmp_path: Path, broker: Broker) -> None:
    """With nothing pending, the cursor moves to the head: the next poll does not walk old rows."""
    agent = write_agent_config(tmp_path / "dev", broker, "cam-i")
    fill_buffer(agent, 3000)
    cfg = load_config(agent)
    client = SyncClient(cfg)
    with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, integrity_check="off") as buf:
        buf.mark_synced("results", range(1, 2001))
        rows = client._pending_after_cursor(buf, "results", 5000)
        assert [r["seq"] for r in rows] == list(range(2001, 3001)), "unsynced rows are found after synced ones"
        assert client._cursor["results"] == 0, "rows found: the cursor moves only when they are sent"
        buf.mark_synced("results", range(2001, 3001))
        assert client._pending_after_cursor(buf, "results", 500) == []
        assert client._cursor["results"] == 3000
        seq = buf.record_result(ResultRecord(time.time(), cfg.device_id, 9, "m1", "ok", 0.1, True))
        assert [r["seq"] for r in client._pending_after_cursor(buf, "results", 500)] == [seq]


def test_drain_is_paced_while_the_line_commits(tmp_path: Path, broker: Broker, cloud: tuple[Path, Proc]) -> None:
    """A backlog drained while new decisions keep arriving: paced, marked in chunks, all once."""
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-p", batch_rows=100)
    cfg = load_config(agent)
    client = SyncClient(cfg, status=lambda: {"model_version": "m1"})
    stop = threading.Event()
    made: list[int] = []

    def line() -> None:  # a camera at ~50 parts/s
        with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, device_id=cfg.device_id) as buf:
            while not stop.wait(0.02):
                made.append(buf.record_result(ResultRecord(time.time(), cfg.device_id, len(made), "m1", "ok", 0.1, True)))

    w = threading.Thread(target=line)
    w.start()
    try:
        client.start()
        wait_until(lambda: client.snapshot()["line_running"], 20, "the sync thread to see the line running")
        fill_buffer(agent, 3000, start_part=100_000)  # the backlog arrives while the line runs
        wait_until(lambda: client.stats.rows_acked["results"] >= 3000 + len(made) - 5, 60, "the backlog acked")
        assert client.snapshot()["line_running"]
    finally:
        stop.set()
        w.join(10)
    wait_until(lambda: all_synced(agent), 20, "everything acked")
    client.stop()
    client.join(3)
    assert sorted(cloud_seqs(cloud_toml, "cam-p")) == list(range(1, 3000 + len(made) + 1))
    assert client.stats.paced_s > 0, "the drain paced itself while the line ran"
    assert client.stats.mark_commits >= 3000 // MARK_CHUNK_ROWS


def test_column_wise_encoding_is_the_one_wire_encoding(tmp_path: Path, broker: Broker) -> None:
    """Batches encoded a column at a time (with breathers) are exactly ``encode_payload``'s bytes."""
    agent = write_agent_config(tmp_path / "dev", broker, "cam-e")
    fill_buffer(agent, 50, events=2)
    cfg = load_config(agent)
    client = SyncClient(cfg)
    breaths: list[int] = []
    with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, integrity_check="off") as buf:
        buf.record_event("note", text="Prüfung ✓", n=3)
        for kind in ("results", "events"):
            rows = buf.pending(kind, limit=500)
            _, payload = client._encode_rows(kind, rows, breathe=lambda: breaths.append(1))
            assert payload == encode_payload(json.loads(payload))
            body = json.loads(payload)
            assert body["seq"] == [r["seq"] for r in rows] and body["first_seq"] == rows[0]["seq"]
            assert list(body["cols"]) == list(COLUMNS[kind])
    assert body["cols"]["detail"][-1] == {"n": 3, "text": "Prüfung ✓"}
    assert breaths, "the encoder gave the GIL away between columns"
    with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, integrity_check="off") as buf:
        buf.record_result(ResultRecord(time.time(), "cam-e", 51, "t1", "scratch", 0.9, False, box=(4, 2, 64, 48)))
        rows = buf.pending("results", limit=500)
        _, payload = client._encode_rows("results", rows, breathe=lambda: None)
    body = json.loads(payload)
    assert payload == encode_payload(body) and body["v"] == 2
    assert list(body["cols"]) == [*COLUMNS["results"], "box"] and body["cols"]["box"][-2:] == [None, [4, 2, 64, 48]]


def test_a_mark_waits_for_the_lines_next_commit(tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the line runs, a mark is written just after one of the agent's commits, so the
    agent's following commit finds SQLite's write lock free."""
    agent = write_agent_config(tmp_path / "dev", broker, "cam-align")
    fill_buffer(agent, 5)
    cfg = load_config(agent)
    client = SyncClient(cfg)
    with Buffer(cfg.buffer.path, device_id=cfg.device_id, integrity_check="off") as buf:
        # Nobody commits: it gives up after MARK_ALIGN_MAX_S rather than hold the drain.
        t0 = time.perf_counter()
        client._follow_line_commit(buf)
        assert time.perf_counter() - t0 >= sync_mod.MARK_ALIGN_MAX_S
        # The agent commits (another connection) a little later: the wait ends right after it.
        monkeypatch.setattr(sync_mod, "MARK_ALIGN_MAX_S", 30.0)
        committed: list[float] = []

        def line() -> None:
            time.sleep(0.2)
            fill_buffer(agent, 1, start_part=100)
            committed.append(time.perf_counter())

        client._aligned_s = 0.0
        worker = threading.Thread(target=line)
        t1 = time.perf_counter()
        worker.start()
        client._follow_line_commit(buf)
        returned = time.perf_counter()
        worker.join()
        assert committed and returned - t1 >= 0.15 and returned < committed[0] + 5.0
        assert client._aligned_s >= 0.15  # the wait is booked apart: the pacing does not count it


def test_forged_acks_mark_only_what_the_device_sent(tmp_path: Path, broker: Broker) -> None:
    """With no cloud running, acks published by someone else (a range never sent, an unknown
    batch id, a real batch id with a wider range) mark nothing the device did not send."""
    agent = write_agent_config(tmp_path / "dev", broker, "cam-forge", batch_rows=5, max_inflight=1, ack_timeout_s=30.0)
    fill_buffer(agent, 17)
    seen: list[dict[str, Any]] = []
    spy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
    spy.on_message = lambda _c, _u, m: seen.append(json.loads(m.payload))
    spy.connect(broker.host, broker.port)
    spy.subscribe(f"{PREFIX}/devices/cam-forge/results", qos=1)
    spy.loop_start()
    client = SyncClient(load_config(agent))
    client.start()
    try:
        wait_until(lambda: seen, 15, "the device's first results batch")
        ack_topic = f"{PREFIX}/devices/cam-forge/ack"

        def forge(batch: str, acked: dict[str, list[list[int]]]) -> None:
            body = {"v": 1, "type": "ack", "device_id": "cam-forge", "batch": batch, "ts": time.time(), "acked": acked}
            spy.publish(ack_topic, encode_payload(body), qos=1).wait_for_publish(5)

        forge("r1-1000000000.forged1", {"results": [[1, 10**9]]})
        wait_until(lambda: client.stats.ignored_acks >= 1, 10, "the forged ack to be counted")
        time.sleep(0.5)  # a mark would have been written by now
        assert unsynced(agent)["results"] == 17, "an ack for a batch never sent marked nothing"
        # The real batch id sniffed off the wire, with a range far wider than that batch.
        first = seen[0]
        assert first["seq"] == [1, 2, 3, 4, 5]
        forge(first["batch"], {"results": [[1, 10**9]], "events": [[1, 50]]})
        wait_until(lambda: unsynced(agent)["results"] == 12, 10, "the sent batch, and only it, marked synced")
        time.sleep(0.5)
        assert unsynced(agent)["results"] == 12
        snap = client.snapshot()
        assert snap["ignored_acks"] == 1 and snap["ignored_ack_rows"] >= 10**9 - 1
    finally:
        client.stop()
        client.join(3)
        spy.loop_stop()
        spy.disconnect()
