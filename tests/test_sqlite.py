"""edge/sqlite.py: the write transaction and the migration runner every store uses.

The old-database tests build their files the way the stores wrote them before the runner
was shared: the ledger table's DDL and rows are written out here literally, so a change
to the runner that no longer reads them fails here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from cloud.registry import OTA_MIGRATIONS, ensure_schema
from cloud.store import MIGRATIONS as STORE_MIGRATIONS
from cloud.store import SQLiteStore
from edge.buffer import MIGRATIONS as BUFFER_MIGRATIONS
from edge.buffer import Buffer
from edge.sqlite import Migration, NamedLedger, VersionedLedger, run_migrations, write_transaction

# The ledgers exactly as the stores created them (sqlite_master.sql).
BUFFER_LEDGER_DDL = 'CREATE TABLE "_migrations" (\n   "version" INTEGER PRIMARY KEY,\n   "name" TEXT,\n   "applied_at" TEXT\n)'
CLOUD_LEDGER_DDL = "CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied REAL)"


def connect(path: Path) -> sqlite_utils.Database:
    return sqlite_utils.Database(sqlite3.connect(str(path), isolation_level=None))


def ledger_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM _migrations ORDER BY 1").fetchall()


# ------------------------------------------------------------ transaction


def test_write_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    db = connect(tmp_path / "t.db")
    db.execute("CREATE TABLE t (x INTEGER)")
    with write_transaction(db.conn) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), write_transaction(db.conn) as conn:
        conn.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("abandon")
    assert not db.conn.in_transaction
    assert [r[0] for r in db.execute("SELECT x FROM t")] == [1]


def test_a_failing_migration_leaves_neither_schema_nor_record(tmp_path: Path) -> None:
    db = connect(tmp_path / "t.db")

    def half_done(d: sqlite_utils.Database) -> None:
        d.execute("CREATE TABLE half (x INTEGER)")
        raise sqlite3.OperationalError("disk I/O error")

    first = Migration("001_first", lambda d: d.execute("CREATE TABLE first (x INTEGER)"))
    assert run_migrations(db, [first], NamedLedger(), what="test") == [first]
    with pytest.raises(sqlite3.OperationalError):
        run_migrations(db, [first, Migration("002_half", half_done)], NamedLedger(), what="test")
    assert not db.table("half").exists()
    assert [r[0] for r in db.execute("SELECT name FROM _migrations")] == ["001_first"]
    assert run_migrations(db, [first], NamedLedger(), what="test") == []  # nothing applied twice


def test_a_versioned_ledger_needs_versions(tmp_path: Path) -> None:
    db = connect(tmp_path / "t.db")
    with pytest.raises(ValueError, match="no version"):
        run_migrations(db, [Migration("nameless", lambda d: None)], VersionedLedger(), what="test")


# ------------------------------------------------- databases written before


def old_buffer(path: Path, upto: int) -> None:
    """A buffer as the agent left it at schema version ``upto``, with rows in it."""
    db = connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(BUFFER_LEDGER_DDL)
    for m in BUFFER_MIGRATIONS[:upto]:
        m.apply(db)
        db.execute("INSERT INTO _migrations VALUES (?, ?, ?)", (m.version, m.name, "2026-01-02T03:04:05.000000+00:00"))
    db.execute(
        "INSERT INTO results (ts, device_id, part_id, model_version, label, score, passed, synced)"
        " VALUES (1.0, 'cam', 1, 'm1', 'ok', 0.1, 1, 1), (2.0, 'cam', 2, 'm1', 'scratch', 0.9, 0, 0)"
    )
    db.execute("INSERT INTO events (ts, kind, detail) VALUES (1.0, 'start', '{}')")
    db.execute("INSERT INTO meta (key, value) VALUES ('device_id', 'cam'), ('buffer_id', 'feedfacefeedface')")
    db.close()


@pytest.mark.parametrize("upto", [1, 2, 3])
def test_a_buffer_written_before_the_shared_runner_opens_and_keeps_its_rows(tmp_path: Path, upto: int) -> None:
    path = tmp_path / "buffer.db"
    old_buffer(path, upto)
    before = ledger_rows(path)
    with Buffer(path, device_id="cam") as buf:
        stats = buf.stats()
        assert stats["schema_version"] == len(BUFFER_MIGRATIONS) == 3
        assert [(r["seq"], r["label"], r["synced"]) for r in buf.tail(5)] == [(1, "ok", True), (2, "scratch", False)]
        assert [r["kind"] for r in buf.events_tail(5)][0] == "start"
        assert buf.buffer_id == "feedfacefeedface"  # the incarnation the cloud keys rows on
    after = ledger_rows(path)
    assert after[:upto] == before  # the old records stay as they were
    assert [(v, n) for v, n, _ in after] == [(m.version, m.name) for m in BUFFER_MIGRATIONS]


def old_cloud_store(path: Path, names: list[str]) -> None:
    """A cloud store as ingest (and ``cloud models add``) left it, with rows in it."""
    db = connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(CLOUD_LEDGER_DDL)
    for m in [*STORE_MIGRATIONS, *OTA_MIGRATIONS]:
        if m.name in names:
            with write_transaction(db.conn):
                m.apply(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (m.name, 1.5))
    db.execute("INSERT INTO results (device_id, seq, ts, label, score, passed) VALUES ('d1', 1, 60.0, 'ok', 0.1, 1)")
    if "ota_001_registry_rollouts" in names:
        db.execute("INSERT INTO ota_models (sha256, version, name, size) VALUES ('ab12', '1.0.0', 'tiny', 10)")
    db.close()


ALL_CLOUD = [m.name for m in [*STORE_MIGRATIONS, *OTA_MIGRATIONS]]


@pytest.mark.parametrize(
    "names", [ALL_CLOUD, ["001_initial"], ["001_initial", "002_result_box", "003_result_minutes", "004_buffer_incarnation"]]
)
def test_a_cloud_store_written_before_the_shared_runner_opens_and_keeps_its_rows(tmp_path: Path, names: list[str]) -> None:
    path = tmp_path / "cloud.db"
    old_cloud_store(path, names)
    before = ledger_rows(path)
    with SQLiteStore(path, samples_dir=tmp_path / "samples") as store:
        ensure_schema(store.db)
        assert [(r["seq"], r["label"], r["box"]) for r in store.results("d1")] == [(1, "ok", None)]
        models = [tuple(r) for r in store.db.conn.execute("SELECT version, name FROM ota_models")]
    assert models == ([("1.0.0", "tiny")] if "ota_001_registry_rollouts" in names else [])
    after = ledger_rows(path)
    assert [r for r in after if r[0] in names] == before  # applied once, records untouched
    assert sorted(r[0] for r in after) == sorted(ALL_CLOUD)


def test_sqlite_errors_are_classified_without_result_codes() -> None:
    """Python 3.10's sqlite3 errors carry no result code; the buffer reads the message, so a
    full disk still evicts synced rows there instead of stopping the writer."""
    from edge.buffer.errors import error_code, is_corruption

    assert error_code(sqlite3.OperationalError("database or disk is full")) == 13
    assert error_code(sqlite3.OperationalError("database is locked")) == 5
    assert is_corruption(sqlite3.DatabaseError("file is not a database"))
    assert error_code(sqlite3.OperationalError("no such table: x")) is None
