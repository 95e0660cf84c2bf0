"""The buffer's tables: their migrations, the statements that write them, how rows read back.

Tables and migrations: docs/buffer.md, "Tables". Migrations run through the shared
runner (edge/sqlite.py) with a versioned ledger: the highest version is the schema version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from sqlite_utils import Database

from edge.exceptions import BufferStoreError
from edge.sqlite import Migration, VersionedLedger, run_migrations, write_transaction

logger = logging.getLogger(__name__)

TABLES = ("results", "samples", "events", "gaps")
BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")  # results: the box as four nullable ints
NO_BOX = (None, None, None, None)
# Always present in stats()["evictions"], zero until something happens.
COUNTER_NAMES = (
    "evicted_synced",
    "evicted_unsynced_pass",
    "evicted_unsynced_fail",
    "evicted_samples",
    "evicted_unsynced_samples",
    "evicted_events",
    "evicted_unsynced_events",
    "evicted_gaps",
    "eviction_passes",
    "recoveries",
)
# An event's detail larger than this is truncated: events travel in one MQTT message.
MAX_EVENT_DETAIL_CHARS = 8 * 1024
# Seqs per statement (DELETE/UPDATE ... IN), well under SQLite's variable limit.
MAX_SEQS_PER_STATEMENT = 500

# ------------------------------------------------------------- migrations

MIGRATIONS: list[Migration] = []
_LEDGER = VersionedLedger()


def migration(version: int, name: str) -> Callable[[Callable[[Database], None]], Callable[[Database], None]]:
    """Register a migration; versions must be registered in order 1, 2, 3, ..."""

    def register(fn: Callable[[Database], None]) -> Callable[[Database], None]:
        expected = len(MIGRATIONS) + 1
        if version != expected:
            raise ValueError(f"migration {name!r} has version {version}, expected {expected}")
        MIGRATIONS.append(Migration(name, fn, version))
        return fn

    return register


@migration(1, "initial_schema")
def _initial_schema(db: Database) -> None:
    # Plain SQL for the AUTOINCREMENT tables: sqlite-utils' create() has no public
    # AUTOINCREMENT option, and a migration must produce the same schema forever.
    db.execute(
        """CREATE TABLE results (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            device_id TEXT,
            part_id INTEGER,
            model_version TEXT,
            label TEXT,
            score REAL,
            passed INTEGER NOT NULL,
            capture_ms REAL,
            preprocess_ms REAL,
            invoke_ms REAL,
            record_ms REAL,
            synced INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.table("results").create_index(["synced", "passed", "seq"], index_name="idx_results_eviction")
    db.execute(
        """CREATE TABLE samples (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            result_seq INTEGER,
            ts REAL NOT NULL,
            reason TEXT NOT NULL,
            label TEXT,
            score REAL,
            width INTEGER,
            height INTEGER,
            jpeg BLOB,
            synced INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT,
            synced INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute(
        """CREATE TABLE gaps (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            table_name TEXT NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            count INTEGER NOT NULL,
            passed_count INTEGER NOT NULL DEFAULT 0,
            failed_count INTEGER NOT NULL DEFAULT 0,
            synced INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.table("counters").create({"name": str, "value": int}, pk="name", not_null=["value"], defaults={"value": 0})
    db.table("meta").create({"key": str, "value": str}, pk="key")


@migration(2, "sync_indexes")
def _sync_indexes(db: Database) -> None:
    # pending() and synced-first eviction walk these tables by (synced, seq).
    for table in ("samples", "events", "gaps"):
        db.table(table).create_index(["synced", "seq"], index_name=f"idx_{table}_synced_seq", if_not_exists=True)


@migration(3, "result_box")
def _result_box(db: Database) -> None:
    # ADD COLUMN only edits the schema (no row is rewritten): instant even on a full buffer,
    # and every existing row reads NULL, i.e. "no box".
    for col in BOX_COLUMNS:
        db.execute(f"ALTER TABLE results ADD COLUMN {col} INTEGER")


LATEST_VERSION = len(MIGRATIONS)


def db_file(db: Database) -> str:
    """The path of the database's main file."""
    return str(db.execute("PRAGMA database_list").fetchone()[2])


def schema_version(db: Database) -> int:
    """The highest applied migration version, 0 for a database without ``_migrations``."""
    return _LEDGER.version(db)


def migrate(db: Database, target: int | None = None) -> list[int]:
    """Apply the registered migrations above the current version, up to ``target``.

    Each runs in its own transaction together with its ``_migrations`` row, so a crash
    leaves the schema at a whole version. Returns the versions applied.
    """
    target = LATEST_VERSION if target is None else target
    with write_transaction(db.conn):
        _LEDGER.create(db)
    current = schema_version(db)
    if current > LATEST_VERSION:
        raise BufferStoreError(
            f"buffer {db_file(db)} has schema version {current} but this agent knows up to"
            f" {LATEST_VERSION}; upgrade the agent, or move the buffer file aside to start a new one"
        )
    applied = run_migrations(db, MIGRATIONS[:target], _LEDGER, what=f"buffer {db_file(db)}")
    return [m.version or 0 for m in applied]


# ------------------------------------------------------------- statements

INSERT_RESULT = (
    "INSERT INTO results (ts, device_id, part_id, model_version, label, score, passed,"
    " capture_ms, preprocess_ms, invoke_ms, record_ms, box_x, box_y, box_w, box_h)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_SAMPLE = (
    "INSERT INTO samples (result_seq, ts, reason, label, score, width, height, jpeg)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
BUMP_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)


def insert_event(conn: sqlite3.Connection, kind: str, detail: dict[str, Any]) -> int:
    """Insert one event (``detail`` as JSON, truncated past MAX_EVENT_DETAIL_CHARS); its seq."""
    text = json.dumps(detail, default=str, sort_keys=True)
    if len(text) > MAX_EVENT_DETAIL_CHARS:
        text = json.dumps({"truncated": True, "preview": text[:1000]})
    cur = conn.execute("INSERT INTO events (ts, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, text))
    return int(cur.lastrowid or 0)


# ---------------------------------------------------------------- reading


def check_table(table: str) -> str:
    """``table`` if it is one of TABLES, else ValueError naming them."""
    if table not in TABLES:
        raise ValueError(f"unknown buffer table {table!r}; use one of {', '.join(TABLES)}")
    return table


def decode_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """A stored row as the buffer hands it out: booleans, ``box`` as a list or None, JSON detail."""
    if "synced" in row:
        row["synced"] = bool(row["synced"])
    if table == "results":
        row["passed"] = bool(row["passed"])
        # A read-only reader may look at a buffer an older agent has not migrated: no box columns.
        box = [row.pop(col, None) for col in BOX_COLUMNS]
        row["box"] = None if box[0] is None else box
    elif table == "events" and isinstance(row.get("detail"), str):
        # Keep the text if it does not parse: a damaged detail must not hide the event.
        with contextlib.suppress(json.JSONDecodeError):
            row["detail"] = json.loads(row["detail"])
    return row
