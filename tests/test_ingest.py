"""Cloud ingest: validation, idempotent storage, ack after commit, crashes and shared workers."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlite_utils
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import parse_cloud_config
from cloud.exceptions import PayloadRejected
from cloud.ingest import chunk_bytes, decode, subscriptions
from cloud.store import SQLiteStore, _m001_initial
from edge.protocol import (
    MAX_PAYLOAD_BYTES,
    SAMPLE_CHUNK_BYTES,
    GapsBatch,
    ResultsBatch,
    SampleChunk,
    encode_payload,
    seq_ranges,
)
from tests.conftest import Broker
from tests.helpers import (
    PREFIX,
    Proc,
    all_synced,
    cloud_query,
    cloud_seqs,
    fill_buffer,
    results_payload,
    sample_chunks,
    start_device,
    start_ingest,
    unsynced,
    wait_until,
    write_agent_config,
    write_cloud_config,
)


def boxed_payload(device_id: str, seqs: list[int], boxes: Any, **over: Any) -> dict[str, Any]:
    """A version 2 results batch: the deciding tile's box per row (or null)."""
    body = results_payload(device_id, seqs, **{"v": 2, **over})
    body["cols"]["box"] = boxes
    return body


# -- validation (no broker) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe not json", "json"),
        (b"[" * 50_000 + b"]" * 50_000, "json"),  # too deeply nested for the parser
        (b"[1, 2]", "schema"),
        (json.dumps(results_payload("d1", [1], v=3)).encode(), "version"),
        (json.dumps(results_payload("d1", [1], v=2)).encode(), "schema"),  # version 2 carries the box column
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 3, 4]], v=1)).encode(), "schema"),  # the box needs version 2
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 3]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 3, 4.5]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 3, "4"]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], [[-1, 2, 3, 4]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 0, 4]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], [[1, 2, 3, 10**12]])).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1], "1,2,3,4")).encode(), "schema"),
        (json.dumps(boxed_payload("d1", [1, 2], [[1, 2, 3, 4]])).encode(), "schema"),  # one box for two rows
        (json.dumps({"type": "results"}).encode(), "version"),
        (json.dumps(results_payload("d1", [1, 2], first_seq=2)).encode(), "schema"),
        (json.dumps(results_payload("d1", [2, 1], first_seq=2, last_seq=1)).encode(), "schema"),
        (json.dumps(results_payload("d1", [1], extra=1)).encode(), "schema"),
        (json.dumps(results_payload("d1", [1], type="gaps")).encode(), "schema"),
        (json.dumps(results_payload("other", [1])).encode(), "device_mismatch"),
        (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", "oversized"),
    ],
)
def test_decode_rejects_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadRejected) as info:
        decode("results", "d1", payload)
    assert info.value.reason == reason


def test_decode_accepts_valid_payloads_and_checks_chunks() -> None:
    batch = decode("results", "d1", encode_payload(results_payload("d1", [3, 4, 9])))
    assert isinstance(batch, ResultsBatch) and batch.rows()[2]["seq"] == 9
    jpeg = os.urandom(SAMPLE_CHUNK_BYTES + 10)
    chunks = [decode("samples", "d1", encode_payload(c)) for c in sample_chunks("d1", 5, jpeg)]
    assert b"".join(chunk_bytes(c) for c in chunks) == jpeg
    short = sample_chunks("d1", 5, jpeg)[0] | {"data": base64.b64encode(b"abc").decode()}
    with pytest.raises(PayloadRejected, match="expected"):
        chunk_bytes(decode("samples", "d1", encode_payload(short)))
    status = decode("status", "d1", b'{"v":1,"state":"offline","device_id":"d1","anything":{"x":1}}')
    assert status.state == "offline"
    boxed = decode("results", "d1", encode_payload(boxed_payload("d1", [3, 4], [[0, 8, 128, 96], None])))
    assert [r["box"] for r in boxed.rows()] == [(0, 8, 128, 96), None]
    assert "box" not in batch.rows()[0]  # version 1 has no box column


def test_a_cloud_store_from_before_boxes_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    old = sqlite_utils.Database(path)
    _m001_initial(old)  # the store as ingest wrote it before result boxes
    old.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied REAL)")
    old.execute("INSERT INTO _migrations VALUES ('001_initial', 1.0)")
    old.execute("INSERT INTO results (device_id, seq, ts, label, score, passed) VALUES ('d1', 1, 1.0, 'ok', 0.1, 1)")
    old.conn.commit()
    old.close()
    with SQLiteStore(path, samples_dir=tmp_path / "samples") as store:
        out = store.store_results(
            ResultsBatch.model_validate(boxed_payload("d1", [2, 3], [[40, 30, 128, 128], None])), received=2.0
        )
        assert out.inserted == 2
        # a resend with one new row: only the new row is counted per minute
        again = store.store_results(ResultsBatch.model_validate(boxed_payload("d1", [3, 4], [None, None], batch="b2")), received=3.0)
        assert (again.inserted, again.duplicates) == (1, 1)
        rows = store.results("d1")
    assert [(r["seq"], r["label"], r["box"]) for r in rows] == [
        (1, "ok", None),
        (2, "ok", [40, 30, 128, 128]),
        (3, "ok", None),
        (4, "ok", None),
    ]
    conn = sqlite3.connect(path)
    names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == ["001_initial", "002_result_box", "003_result_minutes", "004_buffer_incarnation"]
    # the old row was counted by the migration, the new ones as they were stored
    assert conn.execute("SELECT device_id, minute, passed, failed FROM result_minutes").fetchall() == [("d1", 0, 4, 0)]


def test_store_is_idempotent_and_counts_exactly(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db", samples_dir=tmp_path / "samples")
    batch = ResultsBatch.model_validate(results_payload("d1", list(range(1, 301))))
    first = store.store_results(batch, received=time.time())
    again = store.store_results(batch, received=time.time())
    overlap = store.store_results(ResultsBatch.model_validate(results_payload("d1", list(range(250, 351)))), received=time.time())
    assert (first.inserted, first.duplicates) == (300, 0)
    assert (again.inserted, again.duplicates) == (0, 300) and again.acked == {"results": [(1, 300)]}
    assert (overlap.inserted, overlap.duplicates) == (50, 51)
    gaps = GapsBatch.model_validate({"v": 1, "type": "gaps", "device_id": "d1", "batch": "g", "first_seq": 1, "last_seq": 1, "seq": [1],
                                     "cols": {"ts": [1.0], "table_name": ["results"], "first_seq": [400], "last_seq": [499],
                                              "count": [100], "passed_count": [90], "failed_count": [10]}})  # fmt: skip
    store.store_gaps(gaps, received=time.time())
    store.store_gaps(gaps, received=time.time())
    jpeg = os.urandom(2 * SAMPLE_CHUNK_BYTES + 5)
    chunks = [SampleChunk.model_validate(c) for c in sample_chunks("d1", 7, jpeg)]
    outcomes = [store.store_sample_chunk(c, chunk_bytes(c), received=1.0) for c in reversed(chunks)]  # any order
    assert [o.acked for o in outcomes] == [{}, {}, {"samples": [(7, 7)]}]
    assert store.store_sample_chunk(chunks[0], chunk_bytes(chunks[0]), received=1.0).acked == {"samples": [(7, 7)]}
    assert (tmp_path / "samples" / "d1" / "7.jpg").read_bytes() == jpeg
    store.close()
    # Reopening runs no migration twice and keeps every total exact.
    with SQLiteStore(tmp_path / "c.db", samples_dir=tmp_path / "samples") as store:
        (dev,) = store.fleet(now=time.time(), offline_after_s=60, dead_after_s=600)
        assert (dev["results"], dev["gaps"], dev["evicted"], dev["samples"]) == (350, 1, 100, 1)
        assert [r["seq"] for r in store.results("d1", limit=1000)] == list(range(1, 351))
        assert store.samples("d1")[0]["labelled_as"] is None


def test_mismatched_chunks_are_dropped_not_stored(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "c.db", samples_dir=tmp_path / "samples") as store:
        a = sample_chunks("d1", 3, os.urandom(SAMPLE_CHUNK_BYTES + 1))
        b = sample_chunks("d1", 3, os.urandom(SAMPLE_CHUNK_BYTES + 1))
        first = SampleChunk.model_validate(a[0])
        assert store.store_sample_chunk(first, chunk_bytes(first), received=1.0).acked == {}
        other = SampleChunk.model_validate(b[1] | {"sha256": a[1]["sha256"]})
        out = store.store_sample_chunk(other, chunk_bytes(other), received=1.0)
        assert out.acked == {} and out.problem == "sample_checksum"
        assert store.samples() == [] and not (tmp_path / "samples" / "d1" / "3.jpg").exists()


def test_subscriptions_share_data_but_not_status(tmp_path: Path) -> None:
    config = parse_cloud_config({"mqtt": {"topic_prefix": "acme/lw"}, "ingest": {"share_group": "g1"}}, base=tmp_path)
    subs = [s for s, _ in subscriptions(config)]
    assert "$share/g1/acme/lw/devices/+/results" in subs and "$share/g1/acme/lw/devices/+/samples" in subs
    assert "acme/lw/devices/+/status" in subs
    assert seq_ranges([5, 1, 2, 3, 9, 10]) == [(1, 3), (5, 5), (9, 10)]


# -- a real ingest process ---------------------------------------------------------------------


class Client:
    """A plain MQTT client for the test (a rogue device, an ack listener)."""

    def __init__(self, broker: Broker, client_id: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.c.on_message = lambda _c, _u, m: self.messages.append(m)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def publish(self, name: str, payload: bytes) -> None:
        self.c.publish(name, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def counters(cloud_toml: Path) -> dict[str, int]:
    return {name: value for name, value in cloud_query(cloud_toml, "SELECT name, value FROM counters")}


def test_rogue_payloads_are_counted_and_dropped_and_ingest_survives(broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, ingest = cloud
    rogue = Client(broker, "rogue")
    mismatch = {
        "results": results_payload("someone-else", [1]),
        "gaps": {"v": 1, "type": "gaps", "device_id": "someone-else", "batch": "g", "first_seq": 1, "last_seq": 1, "seq": [1],
                 "cols": {"ts": [1.0], "table_name": ["results"], "first_seq": [1], "last_seq": [2], "count": [2],
                          "passed_count": [2], "failed_count": [0]}},
        "events": {"v": 1, "type": "events", "device_id": "someone-else", "batch": "e", "first_seq": 1, "last_seq": 1,
                   "seq": [1], "cols": {"ts": [1.0], "kind": ["start"], "detail": [{}]}},
        "samples": sample_chunks("someone-else", 1, b"jpeg")[0],
        "status": {"v": 1, "state": "online", "device_id": "someone-else"},
    }  # fmt: skip
    garbage = {
        "json": b"\x00\x01garbage",
        "version": json.dumps({"v": 99, "device_id": "rogue"}).encode(),
        "oversized": b'{"v":1,' + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}",
        "schema": json.dumps({"v": 1, "type": "nonsense", "device_id": "rogue"}).encode(),
        "device_mismatch": b"",
    }
    kinds = ("results", "gaps", "events", "samples", "status")
    for kind in kinds:
        for reason, payload in garbage.items():
            if reason == "device_mismatch":
                payload = encode_payload(mismatch[kind])
            rogue.publish(f"{PREFIX}/devices/rogue/{kind}", payload)
    rogue.publish(f"{PREFIX}/devices/rogue/results", b"[" * 60_000 + b"]" * 60_000)
    # A valid batch afterwards is still stored and acked: ingest is alive and well.
    good = Client(broker, "good-listener")
    good.c.subscribe(f"{PREFIX}/devices/good/ack", qos=1)
    time.sleep(0.2)
    good.publish(f"{PREFIX}/devices/good/results", encode_payload(results_payload("good", [1, 2, 3], batch="ok1")))
    wait_until(lambda: good.messages, 10, "the ack of the valid batch")
    ack = json.loads(good.messages[0].payload)
    assert ack["batch"] == "ok1" and ack["acked"] == {"results": [[1, 3]]} and ack["device_id"] == "good"
    # counters reach the store in periodic flushes: the rejections and the stored rows may land in different ones
    wait_until(lambda: (c := counters(cloud_toml)).get("rejected", 0) >= 26 and c.get("stored_results", 0) >= 3, 10,
               "rejections and stored rows to be counted")  # fmt: skip
    got = counters(cloud_toml)
    assert got["rejected_json"] == 6 and got["rejected_version"] == 5 and got["rejected_oversized"] == 5
    assert got["rejected_schema"] == 5 and got["rejected_device_mismatch"] == 5
    assert got["stored_results"] == 3 and "internal_errors" not in got
    assert ingest.alive()
    assert cloud_seqs(cloud_toml, "rogue") == [] and cloud_seqs(cloud_toml, "good") == [1, 2, 3]
    # Rate-limited: one line per reason per interval, not one per message.
    assert len(re.findall(r"rejected a message .*\(json\)", ingest.output())) <= 2
    rogue.close()
    good.close()


def test_a_malformed_box_is_rejected_counted_and_logged_and_good_boxes_are_stored(broker: Broker, cloud: tuple[Path, Proc]) -> None:
    cloud_toml, ingest = cloud
    dev = Client(broker, "boxer")
    dev.c.subscribe(f"{PREFIX}/devices/boxer/ack", qos=1)
    time.sleep(0.2)
    dev.publish(f"{PREFIX}/devices/boxer/results", encode_payload(boxed_payload("boxer", [1, 2], [[5, 5, 0, 9], None], batch="bad")))
    dev.publish(f"{PREFIX}/devices/boxer/results", encode_payload(boxed_payload("boxer", [1, 2], [[5, 5, 64, 48], None], batch="good")))
    wait_until(lambda: dev.messages, 10, "the ack of the good batch")
    assert [json.loads(m.payload)["batch"] for m in dev.messages] == ["good"]  # the bad one is never acked
    wait_until(lambda: counters(cloud_toml).get("rejected_schema", 0) >= 1, 10, "the rejection to be counted")
    assert counters(cloud_toml)["rejected"] == 1
    assert re.search(r"rejected a message on .*boxer/results \(schema\): cols.box: .*box \[5, 5, 0, 9\]", ingest.output())
    assert cloud_query(cloud_toml, "SELECT seq, box_x, box_y, box_w, box_h FROM results WHERE device_id = 'boxer' ORDER BY seq") == [
        (1, 5, 5, 64, 48), (2, None, None, None, None)
    ]
    assert ingest.alive()
    dev.close()


def test_ingest_killed_repeatedly_loses_and_duplicates_nothing(tmp_path: Path, broker: Broker) -> None:
    cloud_toml = write_cloud_config(tmp_path / "cloud", broker)
    agent = write_agent_config(tmp_path / "dev", broker, "cam-k", batch_rows=20, max_inflight=2, ack_timeout_s=0.5)
    n = 4000
    fill_buffer(agent, n, samples=[os.urandom(100_000)], events=2)
    dev = start_device(agent)
    left = n
    mid_stream = 0
    for i in range(4):
        ingest = start_ingest(cloud_toml, name=f"ingest{i}")
        # Kill it as soon as it has stored and acked something: mid-stream, batches in flight.
        wait_until(lambda: unsynced(agent)["results"] < left, 20, "ingest progress", interval=0.01)  # noqa: B023
        ingest.kill9()
        now_left = unsynced(agent)["results"]
        assert now_left < left
        mid_stream += now_left > 0
        left = now_left
        if not left:
            break
    # How fast a restarted ingest drains the rest depends on the box's load; the first kill
    # of a 4,000-row backlog always lands mid-stream, so the test always kills one in flight.
    assert mid_stream >= 1, "every kill came after the backlog had drained"
    ingest = start_ingest(cloud_toml, name="ingest-final")
    wait_until(lambda: all_synced(agent), 40, "the drain to finish")
    seqs = cloud_seqs(cloud_toml, "cam-k")
    assert len(seqs) == n and sorted(seqs) == list(range(1, n + 1))
    assert cloud_query(cloud_toml, "SELECT results, samples FROM devices WHERE device_id = 'cam-k'") == [(n, 1)]
    dev.term()
    assert ingest.term() == 0


def test_two_workers_share_the_load_without_loss_or_duplicates(tmp_path: Path, broker: Broker) -> None:
    cloud_toml = write_cloud_config(tmp_path / "cloud", broker)
    workers = [start_ingest(cloud_toml, name="w1"), start_ingest(cloud_toml, name="w2")]
    agents = []
    for dev_id in ("cam-x", "cam-y"):
        agent = write_agent_config(tmp_path / dev_id, broker, dev_id, batch_rows=25)
        fill_buffer(agent, 1000, samples=[os.urandom(150_000), os.urandom(500)], events=3)
        agents.append(agent)
    devices = [start_device(a) for a in agents]
    for agent in agents:
        wait_until(functools.partial(all_synced, agent), 40, f"{agent.parent.name} to drain")
    for dev_id in ("cam-x", "cam-y"):
        seqs = cloud_seqs(cloud_toml, dev_id)
        assert len(seqs) == 1000 and sorted(seqs) == list(range(1, 1001))
        assert sorted(cloud_seqs(cloud_toml, dev_id, "samples")) == [1, 2]
    for d in devices:
        d.term()
    totals = []
    for w in workers:
        assert w.term() == 0
        line = [ln for ln in w.output().splitlines() if ln.startswith("linewatch ingest stopped:")][-1]
        totals.append(json.loads(line.split(":", 1)[1]))
    assert all(t.get("stored_results", 0) > 0 for t in totals), f"both workers took a share: {totals}"
    assert sum(t.get("stored_results", 0) for t in totals) == 2000
