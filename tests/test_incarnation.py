"""Buffer incarnations: a re-imaged box, a cloned disk and one device id on two boxes.

The cloud keys rows on (device_id, buffer_id, seq), keeps rows whose key is taken by
different content aside (``conflicts``) and shows all of it in ``cloud fleet``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cloud.store import SQLiteStore, identity_state
from edge.buffer import Buffer
from edge.config import load_config
from edge.protocol import ResultsBatch, SampleChunk
from tests.conftest import Broker
from tests.helpers import (
    all_synced,
    cloud_query,
    fill_buffer,
    fleet_states,
    results_payload,
    sample_chunks,
    start_device,
    wait_until,
    write_agent_config,
)


def batch(seqs: list[int], buffer_id: str | None, **cols: Any) -> ResultsBatch:
    body = results_payload("d1", seqs)
    if buffer_id is not None:
        body["buffer_id"] = buffer_id
    body["cols"].update({k: v * len(seqs) if isinstance(v, list) else v for k, v in cols.items()})
    return ResultsBatch.model_validate(body)


def test_a_new_buffer_starts_at_seq_1_and_nothing_is_swallowed(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "c.db", samples_dir=tmp_path / "s") as store:
        old = store.store_results(batch([1, 2, 3], None), received=10.0)  # an agent without buffer ids
        upgraded = store.store_results(batch([3, 4], "aaaaaaaaaaaaaaaa"), received=20.0)  # same box, upgraded
        reimaged = store.store_results(batch([1, 2], "bbbbbbbbbbbbbbbb", ts=[5.0]), received=30.0)
        assert (old.inserted, upgraded.inserted, upgraded.duplicates) == (3, 1, 1), "a legacy row resent is a duplicate"
        assert (reimaged.inserted, reimaged.duplicates, reimaged.conflicts) == (2, 0, 0)
        assert reimaged.acked == {"results": [(1, 2)]}
        (dev,) = store.fleet(now=31.0, offline_after_s=60, dead_after_s=600)
        assert dev["results"] == 6 and dev["identity"] == "new_buffer"
        assert [b["buffer_id"] for b in dev["buffers"]] == ["", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
        assert dev["buffer_id"] == "bbbbbbbbbbbbbbbb"


def test_a_cloned_buffer_is_kept_aside_and_reported(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "c.db", samples_dir=tmp_path / "s") as store:
        store.store_results(batch([1, 2, 3], "cccccccccccccccc"), received=10.0)
        clone = store.store_results(batch([2, 3, 4], "cccccccccccccccc", label=["scratch"], passed=[False]), received=11.0)
        assert (clone.inserted, clone.duplicates, clone.conflicts) == (1, 0, 2)
        assert clone.acked == {"results": [(2, 4)]}, "conflicting rows are kept, so they are acked"
        kept = store.conflicts("d1")
        assert [(c["seq"], json.loads(c["row"])["label"]) for c in kept] == [(2, "scratch"), (3, "scratch")]
        assert [r["label"] for r in store.results("d1")][:3] == ["ok", "ok", "ok"], "the stored rows stay"
        jpeg_a, jpeg_b = os.urandom(300), os.urandom(300)
        for jpeg in (jpeg_a, jpeg_a, jpeg_b):
            (chunk,) = sample_chunks("d1", 9, jpeg)
            out = store.store_sample_chunk(SampleChunk.model_validate({**chunk, "buffer_id": "cccccccccccccccc"}),
                                           jpeg, received=12.0)  # fmt: skip
        assert out.conflicts == 1 and out.acked == {"samples": [(9, 9)]}
        aside = json.loads(store.conflicts("d1")[-1]["row"])["file"]
        assert (tmp_path / "s" / aside).read_bytes() == jpeg_b
        assert Path(store.samples("d1")[0]["file"]).read_bytes() == jpeg_a
        (dev,) = store.fleet(now=12.0, offline_after_s=60, dead_after_s=600)
        assert dev["identity"] == "conflict" and dev["conflicts"] == 3


def test_identity_rules() -> None:
    def b(first: float, last: float) -> dict[str, Any]:
        return {"first_seen": first, "last_seen": last}

    assert identity_state([b(1, 5)], 0) == "ok"
    assert identity_state([b(1, 5), b(6, 9)], 0) == "new_buffer"
    assert identity_state([b(1, 5), b(3, 9)], 0) == "conflict", "two buffers sending at the same time"
    assert identity_state([b(1, 5)], 1) == "conflict"


def test_reimaged_box_over_mqtt_is_stored_whole_and_flagged(tmp_path: Path, broker: Broker, cloud: tuple[Path, Any]) -> None:
    """A box syncs, is re-imaged (fresh buffer.db, seq from 1 again) and syncs again: every
    row of both lives is in the cloud and `cloud fleet --json` says the buffer changed."""
    cloud_toml, _ = cloud
    agent = write_agent_config(tmp_path / "dev", broker, "cam-re")
    fill_buffer(agent, 20)
    with Buffer(load_config(agent).buffer.path) as buf:
        first_id = buf.buffer_id
    device = start_device(agent)
    wait_until(lambda: all_synced(agent), 30, "the first life synced")
    device.term()
    db = load_config(agent).buffer.path
    shutil.move(str(db), str(tmp_path / "old-buffer.db"))
    for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        side.unlink(missing_ok=True)
    fill_buffer(agent, 7, start_part=1000)
    with Buffer(db) as buf:
        second_id = buf.buffer_id
    assert first_id and second_id and first_id != second_id
    device = start_device(agent)
    wait_until(lambda: all_synced(agent), 30, "the second life synced")
    device.term()
    rows = cloud_query(cloud_toml, "SELECT buffer_id, seq, part_id FROM results WHERE device_id = 'cam-re' ORDER BY buffer_id, seq")
    assert len(rows) == 27
    assert sorted(r[2] for r in rows if r[0] == second_id) == list(range(1000, 1007))
    dev = wait_until(lambda: fleet_states(cloud_toml.parent).get("cam-re", {}).get("buffer_id") == second_id
                     and fleet_states(cloud_toml.parent)["cam-re"], 10, "the fleet to show the new buffer")  # fmt: skip
    assert dev["results"] == 27 and dev["identity"] == "new_buffer" and dev["conflicts"] == 0
    assert {b["buffer_id"] for b in dev["buffers"]} == {first_id, second_id}


def test_one_device_id_on_two_boxes_is_flagged_and_both_kept(tmp_path: Path, broker: Broker, cloud: tuple[Path, Any]) -> None:
    """Two real devices configured with one device id (on this open test broker they even
    share a client id and keep knocking each other off): every row of both is stored, and
    the fleet says `conflict`."""
    cloud_toml, _ = cloud
    twins = [write_agent_config(tmp_path / name, broker, "cam-twin") for name in ("box1", "box2")]
    for i, agent in enumerate(twins):
        fill_buffer(agent, 15, start_part=1000 * i)
    devices = [start_device(agent) for agent in twins]
    wait_until(lambda: all(all_synced(a) for a in twins), 60, "both boxes synced")
    rows = cloud_query(cloud_toml, "SELECT count(*), count(DISTINCT buffer_id) FROM results WHERE device_id = 'cam-twin'")
    assert rows == [(30, 2)]
    # Both stay alive: their heartbeats interleave, so their buffers overlap in time.
    dev = wait_until(lambda: (d := fleet_states(cloud_toml.parent)["cam-twin"])["identity"] == "conflict" and d, 20,
                     "the fleet to flag two boxes with one id")  # fmt: skip
    assert len(dev["buffers"]) == 2, dev
    for d in devices:
        d.term()
