"""edge/buffer/ on real SQLite files: migrations, seq, byte budget, eviction, corruption, durability."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlite_utils import Database

from edge.buffer import (
    LATEST_VERSION,
    MIGRATIONS,
    MIN_MAX_BYTES,
    Buffer,
    ResultRecord,
    SampleRecord,
    migrate,
)
from edge.exceptions import BufferStoreError

REPO = Path(__file__).resolve().parents[1]
JPEG = bytes(range(256)) * 8  # 2 KiB stand-in: the buffer stores bytes, it never decodes them


def res(part: int, passed: bool = True, device: str = "line1-cam1") -> ResultRecord:
    return ResultRecord(
        ts=time.time(),
        device_id=device,
        part_id=part,
        model_version="1.2.0",
        label="ok" if passed else "scratch",
        score=0.05 if passed else 0.93,
        passed=passed,
        capture_ms=1.5,
        preprocess_ms=0.8,
        invoke_ms=0.3,
    )


def sample(result_seq: int | None = None, reason: str = "reservoir", jpeg: bytes = JPEG) -> SampleRecord:
    return SampleRecord(
        ts=time.time(), reason=reason, label="ok", score=0.4, width=64, height=48, jpeg=jpeg, result_seq=result_seq
    )


def raw(path: Path) -> sqlite3.Connection:
    """A plain second connection, to look at the file without going through Buffer."""
    return sqlite3.connect(path)


def seqs(path: Path, table: str, where: str = "1") -> list[int]:
    with raw(path) as conn:
        return [r[0] for r in conn.execute(f"SELECT seq FROM {table} WHERE {where} ORDER BY seq")]


# ------------------------------------------------------------ migrations


def test_fresh_buffer_has_wal_full_incremental_vacuum_and_migrations(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Buffer(path) as buf:
        conn = buf.db.conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    with raw(path) as conn:
        first = conn.execute("SELECT version, name, applied_at FROM _migrations ORDER BY version").fetchall()
    assert [(v, n) for v, n, _ in first] == [(m.version, m.name) for m in MIGRATIONS]
    assert [v for v, _, _ in first] == list(range(1, LATEST_VERSION + 1))

    with Buffer(path, synchronous="normal") as buf:
        assert buf.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with raw(path) as conn:
        again = conn.execute("SELECT version, name, applied_at FROM _migrations ORDER BY version").fetchall()
    assert again == first  # reopening applies nothing twice


def test_older_version_database_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    db = Database(path)
    assert migrate(db, target=1) == [1]
    db.execute("INSERT INTO results (ts, passed, label) VALUES (1.0, 1, 'ok')")
    db.close()
    with raw(path) as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "idx_samples_synced_seq" not in indexes

    with Buffer(path) as buf:
        assert buf.stats()["schema_version"] == LATEST_VERSION
        assert [r["label"] for r in buf.tail(5)] == ["ok"]  # data kept across the migration
    with raw(path) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM _migrations ORDER BY version")]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert versions == list(range(1, LATEST_VERSION + 1))
    assert {"idx_samples_synced_seq", "idx_events_synced_seq", "idx_gaps_synced_seq"} <= indexes


def test_buffer_from_before_boxes_upgrades_in_place_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    db = Database(path)
    assert migrate(db, target=2) == [1, 2]  # the schema agents wrote before result boxes
    db.execute(
        "INSERT INTO results (ts, device_id, part_id, model_version, label, score, passed, synced)"
        " VALUES (1.0, 'cam', 1, 'm1', 'ok', 0.1, 1, 1), (2.0, 'cam', 2, 'm1', 'scratch', 0.9, 0, 0)"
    )
    db.execute("INSERT INTO samples (result_seq, ts, reason, label, score, jpeg) VALUES (2, 2.0, 'fail', 'scratch', 0.9, x'ffd8')")
    db.conn.commit()
    db.close()
    with Buffer.open_readonly(path) as old:  # `edge status` beside an agent not upgraded yet
        assert [r["box"] for r in old.tail(5)] == [None, None]

    with Buffer(path) as buf:
        assert buf.stats()["schema_version"] == LATEST_VERSION == 3
        kept = buf.tail(5)
        assert [(r["seq"], r["label"], r["synced"], r["box"]) for r in kept] == [(1, "ok", True, None), (2, "scratch", False, None)]
        assert [r["seq"] for r in buf.pending("results")] == [2]
        assert [r["result_seq"] for r in buf.pending("samples")] == [2]
        seq = buf.record_result(replace(res(3, passed=False), box=(40, 30, 128, 128)))
        assert seq == 3 and buf.tail(1)[0]["box"] == [40, 30, 128, 128]
    with raw(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY version")]
    assert names == ["initial_schema", "sync_indexes", "result_box"]


def test_result_box_is_kept_and_a_malformed_one_never_costs_the_decision(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db") as buf:
        seqs_ = buf.record_results(
            [
                replace(res(1, passed=False), box=(0, 0, 64, 48)),
                res(2),  # a whole-frame model: no box
                replace(res(3, passed=False), box=(-5, 0, 64, 48)),  # the cloud would refuse it
                replace(res(4, passed=False), box=(1.5, 0, 64, 48)),  # type: ignore[arg-type]
            ]
        )
        rows = buf.pending("results")
    assert [r["seq"] for r in rows] == seqs_
    assert [r["box"] for r in rows] == [[0, 0, 64, 48], None, None, None]
    assert [r["passed"] for r in rows] == [False, True, False, False]


def test_newer_schema_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    Buffer(path).close()
    with raw(path) as conn:
        conn.execute("INSERT INTO _migrations VALUES (99, 'from_the_future', 'x')")
    with pytest.raises(BufferStoreError, match="upgrade the agent"):
        Buffer(path)
    assert path.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        Buffer(tmp_path / "b.db", max_bytes=MIN_MAX_BYTES - 1)
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        Buffer(tmp_path / "b.db", synchronous="OFF")
    assert not (tmp_path / "b.db").exists()


# ------------------------------------------------------- record and read


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[Buffer, int, int]]:
    """A buffer with four results (the second failed), one sample and one event."""
    with Buffer(tmp_path / "b.db", device_id="line1-cam1") as buf:
        assert buf.stats()["last_result"] is None
        assert buf.record_result(res(1)) == 1
        assert buf.record_results([res(2, False), res(3), res(4)]) == [2, 3, 4]
        assert buf.record_results([]) == []
        s1 = buf.record_sample(sample(2, "fail"))
        e1 = buf.record_event("camera_up", source="parts.mp4", fps=30)
        yield buf, s1, e1


def test_tail_reads_records_in_order_with_their_write_times(recorded: tuple[Buffer, int, int]) -> None:
    buf, _, _ = recorded
    rows = buf.tail(10)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4]  # newest last
    assert [r["passed"] for r in rows] == [True, False, True, True]
    assert rows[0]["record_ms"] is None  # nothing measured before the first write
    assert rows[1]["record_ms"] > 0  # the previous call's durable write time
    assert buf.last_record_ms is not None and buf.last_record_ms > 0
    assert buf.events_tail(1)[0]["detail"] == {"source": "parts.mp4", "fps": 30}


def test_pending_pages_and_mark_synced_counts_each_row_once(recorded: tuple[Buffer, int, int]) -> None:
    buf, s1, e1 = recorded
    assert [r["seq"] for r in buf.pending("results", limit=2)] == [1, 2]
    assert [r["seq"] for r in buf.pending("results", after_seq=2)] == [3, 4]
    assert buf.pending("samples")[0]["jpeg"] == JPEG
    assert buf.mark_synced("results", [1, 2, 2]) == 2
    assert buf.mark_synced("results", range(3, 5)) == 2
    assert buf.mark_synced("results", range(1, 5)) == 0  # already synced
    assert buf.mark_synced("samples", [s1]) == 1
    assert buf.unsynced_counts() == {"results": 0, "samples": 0, "events": 1, "gaps": 0}
    assert buf.pending("events")[0]["seq"] == e1
    assert buf.pending_gaps() == []
    with pytest.raises(ValueError, match="unknown buffer table"):
        buf.pending("nope")


def test_meta_values_round_trip(recorded: tuple[Buffer, int, int]) -> None:
    buf, _, _ = recorded
    buf.meta_set("model_version", "1.2.0")
    assert buf.meta_get("model_version") == "1.2.0"
    assert buf.meta_get("missing", "dflt") == "dflt"


def test_stats_count_what_was_recorded_and_synced(recorded: tuple[Buffer, int, int]) -> None:
    buf, _, _ = recorded
    buf.mark_synced("results", range(1, 5))
    st = buf.stats()
    assert (st["results"], st["passed"], st["failed"], st["unsynced"]) == (4, 3, 1, 0)
    assert (st["samples"], st["events"], st["last_seq"], st["device_id"]) == (1, 1, 4, "line1-cam1")
    assert st["last_result"]["seq"] == 4
    assert 0 < st["bytes_used"] <= st["max_bytes"]
    assert st["evictions"]["evicted_unsynced_fail"] == 0


def test_sample_reason_and_size_are_checked(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", max_bytes=MIN_MAX_BYTES) as buf:
        with pytest.raises(ValueError, match="sample reason"):
            buf.record_sample(sample(reason="pretty"))
        with pytest.raises(BufferStoreError, match="lower the sample JPEG size"):
            buf.record_sample(sample(jpeg=b"x" * (MIN_MAX_BYTES // 4)))


def test_seq_is_monotonic_and_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, synchronous="NORMAL") as buf:
        assert buf.record_results([res(i) for i in range(5)]) == [1, 2, 3, 4, 5]
        with raw(path) as conn:
            conn.execute("DELETE FROM results")  # even a deleted tail is not handed out again
        assert buf.record_result(res(6)) == 6
    with Buffer(path, synchronous="NORMAL") as buf:
        assert buf.record_result(res(7)) == 7
        assert buf.stats()["last_seq"] == 7


# ---------------------------------------------------------- byte budget


def test_tiny_budget_is_never_exceeded_and_counts_add_up(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    budget = 256 * 1024
    inserted = inserted_samples = 0
    with Buffer(path, max_bytes=budget, synchronous="NORMAL") as buf:
        for batch in range(200):
            if batch % 2:
                new = buf.record_results([res(i, passed=i % 4 != 0) for i in range(20)])
            else:
                new = [buf.record_result(res(i, passed=i % 4 != 0)) for i in range(20)]
            inserted += len(new)
            if batch % 5 == 0:
                buf.record_sample(sample(new[-1]))
                inserted_samples += 1
            if batch % 7 == 0:  # the cloud acknowledges some of it now and then
                buf.mark_synced("results", [r["seq"] for r in buf.pending("results", limit=30)])
            assert buf.used_bytes() <= budget  # margin 0: eviction runs before each COMMIT
            assert path.stat().st_size <= budget
            assert Path(f"{path}-wal").stat().st_size <= 2 * budget  # WAL is capped separately
        st = buf.stats()
        ev = st["evictions"]
        assert ev["eviction_passes"] > 1 and ev["evicted_unsynced_pass"] > 0
        assert st["last_seq"] == inserted == 4000
        evicted_results = ev["evicted_synced"] + ev["evicted_unsynced_pass"] + ev["evicted_unsynced_fail"]
        assert st["results"] + evicted_results == inserted
        assert st["samples"] + ev["evicted_samples"] == inserted_samples
    with raw(path) as conn:
        g = conn.execute(
            "SELECT sum(count), sum(passed_count), sum(failed_count) FROM gaps WHERE table_name = 'results'"
        ).fetchone()
        gs = conn.execute("SELECT coalesce(sum(count), 0) FROM gaps WHERE table_name = 'samples'").fetchone()[0]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert g == (
        ev["evicted_unsynced_pass"] + ev["evicted_unsynced_fail"],
        ev["evicted_unsynced_pass"],
        ev["evicted_unsynced_fail"],
    )
    assert gs == ev["evicted_unsynced_samples"]
    assert path.stat().st_size <= budget  # after the closing checkpoint too


def _insert_until(
    buf: Buffer, make: Callable[[int], ResultRecord], done: Callable[[], bool], limit: int = 20_000
) -> list[int]:
    """Insert ``make(i)`` one at a time until ``done()``; the seqs inserted."""
    out: list[int] = []
    for i in range(limit):
        out.append(buf.record_result(make(i)))
        if done():
            return out
    raise AssertionError("the condition never became true")


def test_eviction_takes_synced_rows_first_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, max_bytes=128 * 1024, synchronous="NORMAL") as buf:
        synced = buf.record_results([res(i, passed=i % 2 == 0) for i in range(500)])
        buf.mark_synced("results", synced)
        _insert_until(buf, lambda i: res(i, passed=False), lambda: buf.counters()["eviction_passes"] >= 1)
        ev = buf.counters()
    left = seqs(path, "results", "synced = 1")
    gone = sorted(set(synced) - set(left))
    assert gone and left  # one pass took some synced rows, not all
    assert max(gone) < min(left)  # oldest first, across passes and fails
    assert ev["evicted_synced"] == len(gone)
    assert ev["evicted_unsynced_pass"] == ev["evicted_unsynced_fail"] == 0
    assert seqs(path, "gaps") == []  # synced rows are in the cloud: no gap


def test_eviction_takes_passes_before_failures_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    # Room for enough rows that the first eviction pass leaves some passes (at 128 KiB it
    # takes them all since rows carry the box columns: nothing left to check the order on).
    with Buffer(path, max_bytes=160 * 1024, synchronous="NORMAL") as buf:
        # One failure in four parts. (Used bytes count pages: when passes and failures
        # alternate 1:1, deleting every pass leaves pages half full, frees none, and the
        # oldest failures must go as well; see the module docstring.)
        mixed = _insert_until(buf, lambda i: res(i, passed=i % 4 != 0), lambda: buf.counters()["eviction_passes"] >= 1)
        passes = [s for i, s in enumerate(mixed) if i % 4 != 0]
        fails = [s for i, s in enumerate(mixed) if i % 4 == 0]
        assert buf.counters()["evicted_unsynced_fail"] == 0
        assert seqs(path, "results", "passed = 0") == fails  # every failure still there
        left = seqs(path, "results", "passed = 1")
        assert left and left == passes[len(passes) - len(left) :]  # the oldest passes went

        more = _insert_until(buf, lambda i: res(i, passed=False), lambda: buf.counters()["evicted_unsynced_fail"] > 0)
        assert seqs(path, "results", "passed = 1") == []  # no failure went before every pass had
        all_fails = fails + more
        left_fails = seqs(path, "results", "passed = 0")
        assert left_fails == all_fails[len(all_fails) - len(left_fails) :]  # then failures, oldest first
        ev = buf.counters()
        gaps = buf.pending_gaps(limit=1000)
    assert ev["evicted_unsynced_pass"] == len(passes)
    assert ev["evicted_unsynced_fail"] == len(all_fails) - len(left_fails)
    assert sum(g["count"] for g in gaps) == ev["evicted_unsynced_pass"] + ev["evicted_unsynced_fail"]
    assert sum(g["passed_count"] for g in gaps) == ev["evicted_unsynced_pass"]
    assert min(g["first_seq"] for g in gaps) == mixed[0]
    assert {g["table_name"] for g in gaps} == {"results"}


def test_eviction_takes_unsynced_samples_before_results(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, max_bytes=128 * 1024, synchronous="NORMAL") as buf:
        kept: list[int] = []

        def make(i: int) -> ResultRecord:
            kept.append(buf.record_sample(sample()))
            return res(i)

        _insert_until(buf, make, lambda: buf.counters()["eviction_passes"] >= 1)
        ev = buf.counters()
        gaps = buf.pending_gaps()
    left = seqs(path, "samples")
    assert ev["evicted_unsynced_pass"] == 0 and ev["evicted_unsynced_samples"] == len(kept) - len(left) > 0
    assert left == kept[len(kept) - len(left) :]
    assert [(g["table_name"], g["count"], g["first_seq"]) for g in gaps] == [
        ("samples", ev["evicted_unsynced_samples"], kept[0])
    ]


# ----------------------------------------------------------- corruption


def test_garbage_file_is_set_aside_and_a_fresh_buffer_starts(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    garbage = b"this is not a database " * 500
    path.write_bytes(garbage)
    with Buffer(path) as buf:
        rec = buf.recovery
        assert rec is not None and "not a database" in rec.reason
        assert rec.kept_aside.name.startswith("buffer.db.corrupt-") and rec.kept_aside.read_bytes() == garbage
        event = buf.events_tail(5)[-1]
        assert event["kind"] == "buffer_recovered"
        assert event["detail"]["kept_aside"] == str(rec.kept_aside)
        assert "not a database" in event["detail"]["reason"]
        assert buf.counters()["recoveries"] == 1
        # Nothing readable: new seqs start above the time in ms, above any seq issued before.
        assert buf.record_result(res(1)) > int(rec.at * 1000) - 10_000
    with Buffer(path) as buf:
        assert buf.recovery is None  # the fresh file is sound


def test_truncated_database_is_recovered_and_seqs_continue(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Buffer(path, synchronous="NORMAL") as buf:
        old = buf.record_results([res(i) for i in range(3000)])
    size = path.stat().st_size
    assert not Path(f"{path}-wal").exists()  # closed cleanly: everything is in the main file
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 1000)  # mid-page
    with Buffer(path) as buf:
        rec = buf.recovery
        assert rec is not None
        assert rec.kept_aside.stat().st_size == size // 2 + 1000
        assert buf.events_tail(1)[0]["kind"] == "buffer_recovered"
        assert buf.record_result(res(0)) > max(old)  # the cloud dedups on seq: never reuse one
        assert buf.stats()["results"] == 1
    with raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_damaged_index_fails_integrity_check_and_seqs_continue_from_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with Buffer(path, synchronous="NORMAL") as buf:
        old = buf.record_results([res(i, passed=i % 3 != 0) for i in range(3000)])
    conn = raw(path)
    # The index's stored entries no longer match its definition: every query still
    # works, but integrity_check reports rows missing from the index.
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute(
        "UPDATE sqlite_master SET sql = replace(sql, 'passed', 'score') WHERE name = 'idx_results_eviction'"
    )
    conn.commit()
    conn.close()
    with Buffer(path) as buf:
        rec = buf.recovery
        assert rec is not None and rec.reason.startswith("integrity_check failed")
        assert rec.seq_floors["results"] == max(old)  # read from the damaged file
        assert rec.seq_floors["samples"] == 0  # readable and never used: no jump
        assert buf.record_result(res(0)) == max(old) + 1
        assert buf.events_tail(1)[0]["detail"]["seq_floors"]["results"] == max(old)


# ------------------------------------------------- readers and threads


def test_open_readonly_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BufferStoreError, match=r"no buffer at .*missing\.db yet: has the agent run\?"):
        Buffer.open_readonly(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_open_readonly_refuses_other_files_and_writes(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with raw(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(BufferStoreError, match="not a Linewatch buffer"):
        Buffer.open_readonly(other)
    Buffer(tmp_path / "b.db", max_bytes=1_000_000).close()
    with Buffer.open_readonly(tmp_path / "b.db") as ro:
        assert ro.stats()["max_bytes"] == 1_000_000
        with pytest.raises(BufferStoreError, match="read-only"):
            ro.record_result(res(1))


def test_status_reads_while_another_thread_writes(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    Buffer(path).close()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with Buffer(path, synchronous="NORMAL", integrity_check="off") as buf:
                for i in range(400):
                    buf.record_result(res(i, passed=i % 5 != 0))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer)
    seen: list[int] = []
    with Buffer.open_readonly(path) as ro:
        t.start()
        while t.is_alive():
            st = ro.stats()  # one snapshot: its numbers agree with each other
            seen.append(st["results"])
            assert st["passed"] + st["failed"] == st["results"] == st["last_seq"]
            assert (st["last_result"] or {"seq": 0})["seq"] == st["results"]
            assert len(ro.tail(3)) >= min(3, st["results"])  # the writer may have moved on since
        t.join()
        final = ro.stats()
    assert not errors
    assert seen == sorted(seen) and len(seen) > 1  # readers see a growing, consistent buffer
    assert final["results"] == 400 and final["failed"] == 80


def test_a_buffer_belongs_to_its_thread(tmp_path: Path) -> None:
    caught: list[BaseException] = []
    with Buffer(tmp_path / "b.db") as buf:

        def other() -> None:
            try:
                buf.record_result(res(1))
            except BaseException as exc:  # noqa: BLE001 - checked below
                caught.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert buf.stats()["results"] == 0
    assert len(caught) == 1 and isinstance(caught[0], BufferStoreError)
    assert "one Buffer per thread" in str(caught[0])


# ---------------------------------------------------------- durability

_WRITER = textwrap.dedent(
    """
    import sys, time
    from edge.buffer import Buffer, ResultRecord
    buf = Buffer(sys.argv[1])
    part = 0
    while True:
        part += 1
        seq = buf.record_result(ResultRecord(time.time(), "d", part, "1", "ok", 0.1, part % 3 != 0, 1.0, 1.0, 1.0))
        print(seq, flush=True)
    """
)


@pytest.mark.timeout(120)
def test_kill_9_keeps_every_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    printed: list[int] = []
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, env=env, cwd=REPO
        ) as proc:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # the writer is up and has committed once
            assert first.endswith(b"\n"), "writer subprocess died before its first commit"
            time.sleep(random.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        lines = (first + rest).split(b"\n")[:-1]  # a torn last line was never complete
        run = [int(x) for x in lines]
        assert run == sorted(set(run)) and (not printed or run[0] > printed[-1])
        printed += run

        with raw(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            stored = [r[0] for r in conn.execute("SELECT seq FROM results ORDER BY seq")]
        assert len(stored) == len(set(stored))
        assert set(printed) <= set(stored)  # every seq reported as committed is there
    assert len(printed) > 3


def test_samples_ride_in_the_same_transaction_as_their_results(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", max_bytes=1_000_000) as buf:
        too_big = sample(reason="fail", jpeg=b"x" * (1_000_000 // 8 + 1))
        got = buf.record_results([res(1), res(2, passed=False), res(3, passed=False)], {1: sample(reason="fail"), 2: too_big})
        rows = buf.db.execute("SELECT result_seq, reason FROM samples").fetchall()
    # the oversized sample is dropped, never the decisions
    assert len(got) == 3
    assert rows == [(got[1], "fail")]


# ------------------------------------------------- full disk, checkpoints


def test_full_disk_is_a_clear_error_loses_nothing_committed_and_resumes(tmp_path: Path) -> None:
    # SQLite's own page limit makes the genuine SQLITE_FULL ("database or disk is full")
    # that a full filesystem gives, without needing root to mount a small one.
    path = tmp_path / "b.db"
    with Buffer(path) as buf:
        committed = buf.record_results([res(i) for i in range(20)])
        conn = buf.db.conn
        conn.execute("PRAGMA max_page_count = 1")  # clamped to the current size: no growth
        with pytest.raises(BufferStoreError, match="disk is full; free space") as info:
            for i in range(500):  # until a page must be added
                committed += buf.record_results([res(100 + i)], {0: sample(reason="fail")})
        assert "database or disk is full" in str(info.value)
        assert not conn.in_transaction  # rolled back whole: no half-written group
        with raw(path) as other:
            assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = [r[0] for r in other.execute("SELECT seq FROM results ORDER BY seq")]
        assert stored == committed  # every committed row, nothing of the failed group
        # space returns: the same group goes in, seqs continue
        conn.execute("PRAGMA max_page_count = 1000000")
        again = buf.record_results([res(999)], {0: sample(reason="fail")})
        assert again[0] > committed[-1]
        assert buf.stats()["results"] == len(committed) + 1


def test_background_checkpoints_copy_the_wal_outside_commits(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, checkpoint="background") as buf:
        ck = buf.checkpointer
        assert ck is not None
        conn = buf.db.conn
        usual = max(16, min(1000, buf.max_bytes // 4096 // 16))
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == usual * 4  # only a backstop
        for i in range(50):  # well under the backstop: only the background thread checkpoints
            buf.record_results([res(i)], {0: sample(reason="fail")})
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        deadline = time.monotonic() + 10
        # the file grows during the round, its counter moves after it: wait for both
        while (path.stat().st_size < pages * 4096 or ck.stats()["runs"] < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size >= pages * 4096, f"the main file never received the WAL's pages: {ck.stats()}"
        assert ck.stats()["runs"] >= 1 and ck.stats()["errors"] == 0, ck.stats()
        thread = ck._thread
    assert thread is not None
    thread.join(10)  # close() asked it to stop; a slow disk may finish one last round first
    assert not thread.is_alive()
    with raw(path) as other:
        assert other.execute("SELECT count(*) FROM results").fetchone()[0] == 50
    with pytest.raises(ValueError, match="checkpoint="):
        Buffer(tmp_path / "c.db", checkpoint="sometimes")  # type: ignore[arg-type]


def test_events_and_meta_ride_in_the_results_transaction(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path) as buf:
        seqs = buf.record_results([res(1), res(2)], events=[("camera_up", {"source": "x"})], meta={"last_part_id": "2"})
        assert seqs == [1, 2]
        assert buf.events_tail(1)[0]["kind"] == "camera_up"
        assert buf.meta_get("last_part_id") == "2"
        assert buf.record_results([], events=[("stop", {"results": 2})]) == []  # events alone still go in
        assert buf.events_tail(1)[0]["detail"] == {"results": 2}
        record_ms = buf.last_record_ms
        buf.record_results([], meta={"last_part_id": "3"})
        assert buf.last_record_ms == record_ms  # only decisions count as a record time
        assert buf.meta_get("last_part_id") == "3"


def test_full_disk_makes_room_from_synced_rows_only(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path) as buf:
        old = buf.record_results([res(i) for i in range(300)], {i: sample(reason="fail") for i in range(0, 300, 3)})
        buf.mark_synced("results", old)
        buf.mark_synced("samples", range(1, 1000))
        keep = buf.record_results([res(1000 + i, passed=False) for i in range(50)])  # not in the cloud yet
        buf.db.conn.execute("PRAGMA max_page_count = 1")  # the disk is full from here on
        new = []
        for i in range(100):  # far more than the free space left in the file's pages
            new += buf.record_results([res(2000 + i)], {0: sample(reason="fail")})
        counters = buf.counters()
        assert counters["evicted_synced"] > 0 and counters["evicted_unsynced_pass"] == counters["evicted_unsynced_fail"] == 0
        stored = set(seqs(path, "results"))
        assert set(keep) | set(new) <= stored  # every unsynced row kept
        assert buf.pending_gaps() == []  # nothing the cloud lacks was evicted
        assert any(e["kind"] == "eviction" and e["detail"]["reason"] == "disk_full" for e in buf.events_tail(50))
        # once every synced row is gone, a full disk is an error again (the agent retries)
        with pytest.raises(BufferStoreError, match="disk is full"):
            for i in range(2000):
                buf.record_results([res(5000 + i)], {0: sample(reason="fail")})
        assert buf.counters()["evicted_unsynced_pass"] == 0
        assert set(keep) | set(new) <= set(seqs(path, "results"))
