"""The agent's local SQLite buffer: every decision, durably, before it goes anywhere.

One file (``buffer.path``) opened through sqlite-utils over the standard ``sqlite3`` module.

Tables (schema version 3, see :data:`MIGRATIONS`)::

    results    one row per decision; ``seq`` is the monotonic id the cloud dedups on;
               ``box_x, box_y, box_w, box_h``: the deciding tile in camera-frame pixels
               (NULL for whole-frame models), read back as ``box`` [x, y, w, h] or None
    samples    JPEG frames kept for labelling (fails, low confidence, a reservoir)
    events     camera_up/down, model_loaded, eviction, start, stop, buffer_recovered, ...
    gaps       every eviction of rows the cloud has not stored yet, as seq ranges
    counters   eviction and recovery counters (name -> value)
    meta       small key/value settings (device_id, max_bytes, buffer_id)
    _migrations  version, name, applied_at of every applied migration

Every ``seq`` is ``INTEGER PRIMARY KEY AUTOINCREMENT``: SQLite never hands out a seq
again, even after the newest rows are deleted. If the file is found damaged and set
aside, the fresh file continues above the highest seq that can be read from the damaged
one (or above the current Unix time in milliseconds when nothing can be read), so the
cloud's ``(device_id, seq)`` dedup never swallows new rows.

Durability. WAL journal; ``synchronous=FULL`` by default, so a commit is on disk
(the WAL is fsynced) before :meth:`Buffer.record_result` returns. ``NORMAL`` skips
that fsync: still safe against a killed process, but the last commits may be lost
on power loss. Nothing here works around SQLite's own crash safety.

Byte budget. *Used bytes* are the live pages of the main file,
``(page_count - freelist_count) * page_size``. The check costs two PRAGMAs and runs
inside every write transaction, before its COMMIT; when used bytes exceed ``max_bytes``
the same transaction evicts, by value, until they are under a low-water mark
(``max_bytes`` minus 10 %, at most 2 MiB at a time so one eviction pass stays short):

1. synced rows (already in the cloud): samples, results, events, gaps, oldest first;
2. unsynced samples, oldest first;
3. unsynced PASS results, oldest first;
4. unsynced events, oldest first;
5. unsynced FAIL results, oldest first.

Unsynced gap records are never evicted: they are the record of what was lost. Each
eviction pass writes one gap row per table it took unsynced results or samples from
(first_seq, last_seq, count, passed_count, failed_count; ``count`` rows of that seq
range are gone and will never arrive), bumps the counters, records an ``eviction``
event and runs ``PRAGMA incremental_vacuum`` so the file shrinks at the next
checkpoint. So a committed state never holds more than ``max_bytes`` of live pages
(margin 0), unless unsynced gap records alone exceed it. Because used bytes are pages,
deleting a row frees nothing until its page empties or falls under about 1/3 full
(SQLite then merges it with a neighbour): with most parts passing, evicting passes
frees pages; if passes and failures alternate 1:1, deleting every pass leaves each
page half full, so the oldest failures go too (still after every pass). The WAL is not counted in
used bytes; it is kept small instead: ``wal_autocheckpoint`` is 1/16 of the budget
(between 16 and 1000 pages) and ``journal_size_limit`` truncates it back to that size
after each checkpoint. A reader that keeps one read transaction open stops
checkpoints and lets the WAL grow until it lets go.

Full disk. A write that fails with SQLITE_FULL ("database or disk is full": the
filesystem, or the file's page limit) first evicts synced rows, which the cloud already
has, in the budget's order (:meth:`Buffer.make_room`). Their pages are then reused by new
rows without growing the file. It never evicts an unsynced row for this, and it
counts every eviction and records an ``eviction`` event with ``reason: disk_full``.
If nothing synced is left, the write raises
:class:`~edge.exceptions.BufferStoreError` saying to free space; the agent retries.

Checkpoints off the commit path. SQLite's automatic checkpoint runs inside the COMMIT
that crosses ``wal_autocheckpoint``: that commit copies the WAL into the main file and
fsyncs both before it returns, a latency spike for whoever waits on it. With
``checkpoint="background"`` (what the agent uses) a :class:`Checkpointer` thread with
its own connection runs ``PRAGMA wal_checkpoint(PASSIVE)`` instead. PASSIVE never blocks
the writer: it copies what no reader still needs and lets commits carry on. Every round
costs fsyncs that share the disk with the commits, so the rounds adapt. They come every
0.25 to 2 s, sooner when the WAL held more than half the usual checkpoint size. The
writer's own automatic checkpoint stays on as a backstop at ``BACKSTOP_FACTOR`` times
the usual size, so the WAL stays bounded even if the background thread falls behind.

Threads. One :class:`Buffer` per thread: connections are opened with
``check_same_thread=True``, so using a Buffer from another thread raises
:class:`~edge.exceptions.BufferStoreError` at once rather than corrupting state. WAL
lets reader connections (``linewatch edge status``, a sync thread) run beside the
writer; write transactions start with ``BEGIN IMMEDIATE`` and wait up to
``busy_timeout_s`` for each other. Open the agent's writer first; further Buffers on
the same file in the same process may pass ``integrity_check="off"``.

Corruption. On open, an existing file is checked with ``PRAGMA integrity_check``, or
``PRAGMA quick_check`` above 64 MiB (quick_check skips the index-content cross-check,
which dominates the time on large files; page structure, free list and record
formats are still verified). A file that fails, or is not a database at all, is
moved aside with its -wal and -shm to ``<name>.corrupt-<UTC timestamp>``, a fresh
buffer is created and a ``buffer_recovered`` event records the reason and the path;
:attr:`Buffer.recovery` holds the same for the agent to log. A locked, unreadable
or read-only file is *not* corruption and raises BufferStoreError instead.

``record_ms``: a row cannot contain the duration of its own commit without a second
write, so each results row stores the measured time of the previous
``record_result``/``record_results`` call on the same Buffer (NULL for the first).
:attr:`Buffer.last_record_ms` is the latest measurement.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sqlite_utils import Database

from edge.exceptions import BufferStoreError
from edge.protocol import box_problem
from edge.sqlite import Migration, VersionedLedger, run_migrations, write_transaction

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 200_000_000
# Below this the schema, its indexes and a few rows cannot fit.
MIN_MAX_BYTES = 64 * 1024
# An eviction pass frees this fraction of the budget, at most MAX_EVICT_BYTES.
LOW_WATER_FRACTION = 0.10
MAX_EVICT_BYTES = 2 * 1024 * 1024
# integrity_check above this size takes seconds on an SD card; quick_check instead.
QUICK_CHECK_ABOVE_BYTES = 64 * 1024 * 1024
# One JPEG sample may use at most this fraction of the budget.
MAX_SAMPLE_FRACTION = 8
# An event's detail larger than this is truncated: events travel in one MQTT message.
MAX_EVENT_DETAIL_CHARS = 8 * 1024

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
TABLES = ("results", "samples", "events", "gaps")
SAMPLE_REASONS = ("fail", "low_confidence", "reservoir")
# Drift samples (edge/drift.py): ``drift_<kind>:<measure>+<measure>``, at most 64 characters.
DRIFT_SAMPLE_KINDS = ("fail", "near_threshold", "random")
_BOX_COLUMNS = ("box_x", "box_y", "box_w", "box_h")  # results: the box as four nullable ints
_NO_BOX = (None, None, None, None)
EVENT_KINDS = (
    "start",
    "stop",
    "camera_up",
    "camera_down",
    "model_loaded",
    "eviction",
    "buffer_recovered",
)
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

IntegrityMode = Literal["auto", "full", "quick", "off"]
CheckpointMode = Literal["auto", "background"]

# Background checkpoints: how often, and the writer's own backstop (x the usual size).
CHECKPOINT_INTERVAL_S = (0.25, 2.0)  # shortest and longest wait between rounds
BACKSTOP_FACTOR = 4
# Background work yields the CPU to inspection (Linux nice of the thread alone).
BACKGROUND_NICE = 10


def nice_this_thread(increment: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread); no-op elsewhere."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_READONLY = 8
_SQLITE_FULL = 13


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class ResultRecord:
    """One pass/fail decision as the agent hands it to the buffer."""

    ts: float  # unix time of the capture
    device_id: str
    part_id: int | None
    model_version: str
    label: str
    score: float  # defect score, higher means more likely defective
    passed: bool
    capture_ms: float | None = None
    preprocess_ms: float | None = None
    invoke_ms: float | None = None
    # Tiled models: the tile whose score decided, (x, y, width, height) in camera-frame pixels.
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class SampleRecord:
    """One JPEG frame kept for labelling, with why it was kept."""

    ts: float
    reason: str  # one of SAMPLE_REASONS, or drift_<kind>:<measures> (sample_reason_ok)
    label: str
    score: float
    width: int
    height: int
    jpeg: bytes = field(repr=False)
    result_seq: int | None = None


def sample_reason_ok(reason: str) -> bool:
    """A reason the sampler gives: a normal one, or a drift one naming its kind (and measures)."""
    if reason in SAMPLE_REASONS:
        return True
    kind = reason[len("drift_"):].split(":", 1)[0] if reason.startswith("drift_") else None
    return kind in DRIFT_SAMPLE_KINDS and len(reason) <= 64


@dataclass(frozen=True)
class Recovery:
    """A damaged buffer file was set aside and a fresh one started."""

    reason: str
    kept_aside: Path
    at: float  # unix time
    seq_floors: dict[str, int]  # table -> seq the fresh file continues above


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
    for col in _BOX_COLUMNS:
        db.execute(f"ALTER TABLE results ADD COLUMN {col} INTEGER")


LATEST_VERSION = len(MIGRATIONS)


def _db_file(db: Database) -> str:
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
            f"buffer {_db_file(db)} has schema version {current} but this agent knows up to"
            f" {LATEST_VERSION}; upgrade the agent, or move the buffer file aside to start a new one"
        )
    applied = run_migrations(db, MIGRATIONS[:target], _LEDGER, what=f"buffer {_db_file(db)}")
    return [m.version or 0 for m in applied]


# ----------------------------------------------------------------- helpers

_INSERT_RESULT = (
    "INSERT INTO results (ts, device_id, part_id, model_version, label, score, passed,"
    " capture_ms, preprocess_ms, invoke_ms, record_ms, box_x, box_y, box_w, box_h)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SAMPLE = (
    "INSERT INTO samples (result_seq, ts, reason, label, score, width, height, jpeg)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_BUMP_COUNTER = (
    "INSERT INTO counters (name, value) VALUES (?, ?)"
    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)

# Eviction steps in order: (table, [WHERE clauses merged oldest first], unsynced?).
# Each clause walks an index in seq order; synced results come from two index
# ranges (pass and fail) merged by seq so "oldest first" holds across both.
_EVICTION_STEPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("samples", ("synced = 1",), False),
    ("results", ("synced = 1 AND passed = 1", "synced = 1 AND passed = 0"), False),
    ("events", ("synced = 1",), False),
    ("gaps", ("synced = 1",), False),
    ("samples", ("synced = 0",), True),
    ("results", ("synced = 0 AND passed = 1",), True),
    ("events", ("synced = 0",), True),
    ("results", ("synced = 0 AND passed = 0",), True),
)
_MAX_EVICT_BATCH = 500  # rows per DELETE, well under SQLite's variable limit


def _error_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else int(code) & 0xFF


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = _error_code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _is_full(exc: BufferStoreError) -> bool:
    """Whether a store error came from SQLITE_FULL (the disk, or the file's page limit)."""
    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and _error_code(cause) == _SQLITE_FULL


def _check_table(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown buffer table {table!r}; use one of {', '.join(TABLES)}")
    return table


def _decode_row(table: str, row: dict[str, Any]) -> dict[str, Any]:
    if "synced" in row:
        row["synced"] = bool(row["synced"])
    if table == "results":
        row["passed"] = bool(row["passed"])
        # A read-only reader may look at a buffer an older agent has not migrated: no box columns.
        box = [row.pop(col, None) for col in _BOX_COLUMNS]
        row["box"] = None if box[0] is None else box
    elif table == "events" and isinstance(row.get("detail"), str):
        # Keep the text if it does not parse: a damaged detail must not hide the event.
        with contextlib.suppress(json.JSONDecodeError):
            row["detail"] = json.loads(row["detail"])
    return row


def _salvage_seq_floors(kept: Path) -> dict[str, int]:
    """The highest seq per table readable from a damaged file, else the time in ms.

    A fresh buffer continues above these so the cloud never sees a seq twice.
    """
    floors: dict[str, int] = {}
    try:
        conn = sqlite3.connect(kept.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error:
        conn = None
    for table in TABLES:
        found: list[int] = []  # an answer without a row (never used) counts as 0
        if conn is not None:
            queries: tuple[tuple[str, tuple[str, ...]], ...] = (
                ("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)),
                (f"SELECT max(seq) FROM {table}", ()),
            )
            for sql, params in queries:
                try:
                    row = conn.execute(sql, params).fetchone()
                except sqlite3.Error:
                    continue
                found.append(int(row[0]) if row and row[0] is not None else 0)
        # Fallback: milliseconds since 1970 is above any seq a line could have issued
        # unless it averaged more than 1000 rows/s since the previous recovery.
        floors[table] = max(found) if found else int(time.time() * 1000)
    if conn is not None:
        conn.close()
    return floors


# ------------------------------------------------------------ checkpoints


class Checkpointer:
    """PASSIVE WAL checkpoints from a thread and connection of their own.

    Moves the copy of the WAL into the main file, and its two fsyncs, off the commits
    of the writer (see the module docstring). ``PASSIVE`` takes no writer lock and
    never waits: frames a reader still needs are left for the next round. Errors (a
    full disk, a locked file) are logged once per kind and retried next round; the
    writer's backstop checkpoint keeps the WAL bounded meanwhile.

    ``stats()`` gives ``runs``, ``incomplete`` rounds (a reader held frames back),
    ``errors``, the WAL frames seen at the last round and the slowest round in ms.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        target_frames: int = 250,
        interval_s: tuple[float, float] = CHECKPOINT_INTERVAL_S,
        busy_timeout_s: float = 5.0,
    ) -> None:
        self.path = Path(path)
        # The checkpointing connection's synchronous decides whether the main file is
        # fsynced before the WAL may be reused: it must match the writer's.
        self.synchronous = synchronous
        # Rounds come sooner while a round finds more than target_frames in the WAL, later
        # while it finds less: few fsyncs at a paced camera, a short WAL under a backlog.
        self.target_frames = max(1, target_frames)
        self.min_interval_s, self.max_interval_s = interval_s
        self.interval_s = self.min_interval_s
        self.busy_timeout_s = busy_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._stats: dict[str, float] = {"runs": 0, "incomplete": 0, "errors": 0, "wal_frames": 0, "max_ms": 0.0}

    def start(self) -> None:
        """Start the thread (it opens its own connection)."""
        self._thread = threading.Thread(target=self._main, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop after the round in progress; wait up to ``timeout`` s."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stats(self) -> dict[str, float]:
        """Counters of the rounds so far (a copy)."""
        return dict(self._stats)

    def _main(self) -> None:
        nice_this_thread()
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            logger.warning("background checkpoints of %s not started (%s); the writer checkpoints itself", self.path, exc)
            return
        try:
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # this connection never writes anyway
            while not self._stop.wait(self.interval_s):
                frames = self.run_once(conn)
                factor = 0.5 if frames >= self.target_frames else 1.5
                self.interval_s = min(self.max_interval_s, max(self.min_interval_s, self.interval_s * factor))
        finally:
            conn.close()

    def run_once(self, conn: sqlite3.Connection) -> int:
        """One PASSIVE checkpoint round on ``conn``; the frames the WAL held (0 on error)."""
        t0 = time.perf_counter()
        try:
            busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self._stats["errors"] += 1
            if str(exc) != self._last_error:
                logger.warning("background checkpoint of %s failed: %s (retrying)", self.path, exc)
                self._last_error = str(exc)
            return 0
        self._last_error = None
        ms = (time.perf_counter() - t0) * 1000.0
        self._stats["runs"] += 1
        self._stats["wal_frames"] = int(log)
        if busy or (log >= 0 and done < log):
            self._stats["incomplete"] += 1
        self._stats["max_ms"] = max(self._stats["max_ms"], ms)
        return max(0, int(log))


# ------------------------------------------------------------------ buffer


class Buffer:
    """The agent's durable SQLite buffer (see the module docstring).

    ``path`` is created with its folder if missing. ``max_bytes`` is the byte budget
    (every Buffer opened on one file should get the same value, from
    ``buffer.max_bytes``); ``synchronous`` is FULL or NORMAL; ``device_id`` is kept in
    ``meta``; ``busy_timeout_s`` is how long a write waits for another writer;
    ``integrity_check`` is ``auto`` (full check up to 64 MiB, quick above), ``full``,
    ``quick`` or ``off``; ``checkpoint`` is ``auto`` (SQLite checkpoints inside the
    commit that fills the WAL) or ``background`` (a :class:`Checkpointer` thread does
    it, see the module docstring). After opening, :attr:`recovery` is set if the file
    was found damaged and replaced. Raises ValueError for bad arguments and
    :class:`~edge.exceptions.BufferStoreError` when the file cannot be used.

    Example::

        with Buffer("buffer.db", max_bytes=50_000_000) as buf:
            seq = buf.record_result(ResultRecord(time.time(), "line1-cam1", 7, "1.0.0", "ok", 0.02, True))
    """

    checkpointer: Checkpointer | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        synchronous: str = "FULL",
        device_id: str | None = None,
        busy_timeout_s: float = 5.0,
        integrity_check: IntegrityMode = "auto",
        checkpoint: CheckpointMode = "auto",
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(
                f"max_bytes={max_bytes} is too small for the buffer schema; use at least"
                f" {MIN_MAX_BYTES} ({MIN_MAX_BYTES // 1024} KiB), typically tens of MB"
            )
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous={synchronous!r} is not supported; use FULL or NORMAL")
        if integrity_check not in ("auto", "full", "quick", "off"):
            raise ValueError(f"integrity_check={integrity_check!r}; use auto, full, quick or off")
        if checkpoint not in ("auto", "background"):
            raise ValueError(f"checkpoint={checkpoint!r}; use auto or background")
        self._setup(Path(path), readonly=False, busy_timeout_s=busy_timeout_s)
        self.max_bytes = max_bytes
        self.synchronous = sync
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BufferStoreError(
                f"cannot create the folder for buffer {self.path} ({exc}); check buffer.path"
            ) from exc
        self.db = self._open_writer(integrity_check)
        self._page_size = int(self.db.conn.execute("PRAGMA page_size").fetchone()[0])
        self._configure_wal(backstop=checkpoint == "background")
        with self._write("store settings"):
            self._meta_put("max_bytes", str(max_bytes))
            if self._meta_read("buffer_id") is None:
                # This file's incarnation: a re-imaged box or a fresh file starts seq again
                # (or a cloned disk repeats them); the cloud keys rows on it (docs/sync.md).
                self._meta_put("buffer_id", os.urandom(8).hex())
            if device_id is not None:
                old = self._meta_read("device_id")
                if old is not None and old != device_id:
                    logger.warning("buffer %s was used by device %s, now by %s", self.path, old, device_id)
                self._meta_put("device_id", device_id)
        if self.recovery is not None:
            self._record_recovery(self.recovery)
        if checkpoint == "background":
            ck = Checkpointer(
                self.path, synchronous=sync, busy_timeout_s=busy_timeout_s, target_frames=self._wal_pages() // 2
            )
            ck.start()
            self.checkpointer = ck

    def _setup(self, path: Path, *, readonly: bool, busy_timeout_s: float) -> None:
        self.path = path
        self.readonly = readonly
        self.busy_timeout_s = busy_timeout_s
        self.recovery: Recovery | None = None
        self.last_record_ms: float | None = None
        self.samples_refused = 0  # samples not kept (bad reason, too large): counted, never fatal
        self.max_bytes = 0
        self.synchronous = ""
        self._page_size = 4096
        self._closed = False
        self.checkpointer = None

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> Buffer:
        """Open an existing buffer for reading only (``linewatch edge status/results``).

        Never creates, migrates or repairs the file; safe while the agent writes to it.
        """
        p = Path(path)
        if not p.is_file():
            raise BufferStoreError(
                f"no buffer at {p} yet: has the agent run? (`linewatch edge run` creates it;"
                " check buffer.path in the agent config)"
            )
        self = cls.__new__(cls)
        self._setup(p, readonly=True, busy_timeout_s=busy_timeout_s)
        try:
            conn = sqlite3.connect(
                p.resolve().as_uri() + "?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=True,
            )
        except sqlite3.Error as exc:
            raise BufferStoreError(f"cannot open buffer {p} for reading ({exc}); check its permissions") from exc
        try:
            conn.execute("PRAGMA query_only = 1")
            names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise BufferStoreError(
                f"cannot read buffer {p} ({exc}); if it is damaged the agent sets it aside at its next start"
            ) from exc
        if not {"_migrations", *TABLES, "counters", "meta"} <= names:
            conn.close()
            raise BufferStoreError(
                f"{p} is not a Linewatch buffer (its tables are missing); check buffer.path in the agent config"
            )
        self.db = Database(conn, recursive_triggers=False, execute_plugins=False)
        self.max_bytes = int(self._meta_read("max_bytes") or 0)
        return self

    # -------------------------------------------------------- opening

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(
                str(self.path),
                timeout=self.busy_timeout_s,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=True,
            )
        except sqlite3.Error as exc:
            raise BufferStoreError(
                f"cannot open buffer {self.path} ({exc}); check the folder exists and the agent user can write it"
            ) from exc

    def _open_writer(self, integrity: IntegrityMode) -> Database:
        """Open, check, configure and migrate; set a damaged file aside at most once."""
        for attempt in (1, 2):
            reason: str | None = None
            conn = self._connect()
            try:
                size = self.path.stat().st_size if self.path.exists() else 0
                if attempt == 1 and size > 0:
                    reason = self._check_integrity(conn, size, integrity)
                if reason is None:
                    db = Database(conn, recursive_triggers=False, execute_plugins=False)
                    self._configure_new(conn)
                    migrate(db)
                    return db
            except sqlite3.Error as exc:
                if attempt == 2 or not _is_corruption(exc):
                    conn.close()
                    raise self._store_error("open", exc) from exc
                reason = f"{type(exc).__name__}: {exc}"
            except BaseException:
                conn.close()
                raise
            conn.close()
            self.recovery = self._set_aside(reason)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_integrity(self, conn: sqlite3.Connection, size: int, mode: IntegrityMode) -> str | None:
        """None when the file is sound, else why not. Raises sqlite3 errors (not a db, locked)."""
        if mode == "off":
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return None
        pragma = "quick_check" if mode == "quick" or (mode == "auto" and size > QUICK_CHECK_ABOVE_BYTES) else "integrity_check"
        started = time.monotonic()
        problems = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
        logger.debug("%s of %s (%s bytes) took %.3f s", pragma, self.path, size, time.monotonic() - started)
        if problems == ["ok"]:
            return None
        return f"{pragma} failed: " + "; ".join(problems[:5])

    def _set_aside(self, reason: str) -> Recovery:
        """Move the damaged file and its -wal/-shm to ``<name>.corrupt-<UTC timestamp>``."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        kept = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while kept.exists():
            kept = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
            n += 1
        try:
            os.replace(self.path, kept)
            # Same suffixes as SQLite's, so the kept file opens with its own WAL.
            for suffix in ("-wal", "-shm"):
                side = Path(f"{self.path}{suffix}")
                if side.exists():
                    os.replace(side, Path(f"{kept}{suffix}"))
        except OSError as exc:
            raise BufferStoreError(
                f"buffer {self.path} is damaged ({reason}) and could not be moved aside ({exc});"
                " move or delete it by hand, then restart the agent"
            ) from exc
        floors = _salvage_seq_floors(kept)
        logger.warning("buffer %s is damaged (%s); kept it as %s and started a fresh buffer", self.path, reason, kept)
        return Recovery(reason=reason, kept_aside=kept, at=time.time(), seq_floors=floors)

    def _configure_new(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
        if empty:
            # Only takes effect before the first table exists; lets eviction shrink the file.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise BufferStoreError(
                f"buffer {self.path} cannot use WAL (journal_mode stayed {mode}); put buffer.path on a local disk"
            )
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        if not empty and conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            logger.warning(
                "buffer %s was created without auto_vacuum=INCREMENTAL: evicted space is reused"
                " but the file will not shrink (VACUUM it while the agent is stopped to fix)",
                self.path,
            )

    def _wal_pages(self) -> int:
        """The usual checkpoint size in pages: 1/16 of the budget, between 16 and 1000."""
        return max(16, min(1000, self.max_bytes // self._page_size // 16))

    def _configure_wal(self, *, backstop: bool = False) -> None:
        # Keep the WAL small relative to the budget (it is not counted in used bytes).
        pages = self._wal_pages()
        conn = self.db.conn
        # With a background checkpointer the writer checkpoints only if that falls far behind.
        conn.execute(f"PRAGMA wal_autocheckpoint = {pages * BACKSTOP_FACTOR if backstop else pages}")
        conn.execute(f"PRAGMA journal_size_limit = {pages * self._page_size}")

    def _record_recovery(self, rec: Recovery) -> None:
        with self._write("record the recovery") as conn:
            for table, floor in rec.seq_floors.items():
                if conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (floor, table)).rowcount == 0:
                    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, floor))
            conn.execute(_BUMP_COUNTER, ("recoveries", 1))
            self._insert_event(
                "buffer_recovered",
                {"reason": rec.reason, "kept_aside": str(rec.kept_aside), "seq_floors": rec.seq_floors},
            )

    # ----------------------------------------------------- transactions

    def _store_error(self, what: str, exc: sqlite3.Error) -> BufferStoreError:
        code = _error_code(exc)
        where = f"could not {what} in buffer {self.path}"
        if code == _SQLITE_BUSY:
            hint = (
                f"it stayed locked for {self.busy_timeout_s:g} s; is a second agent using the same buffer.path?"
            )
        elif code == _SQLITE_FULL:
            hint = "the disk is full; free space on the device or lower buffer.max_bytes"
        elif code == _SQLITE_READONLY:
            hint = "the file is read-only; check the agent user can write it and its folder"
        elif _is_corruption(exc):
            hint = "the file is damaged; restart the agent so it sets the file aside and starts a fresh buffer"
        elif isinstance(exc, sqlite3.ProgrammingError):
            hint = "a Buffer belongs to the thread that opened it; open one Buffer per thread"
        else:
            hint = "see the SQLite message"
        return BufferStoreError(f"{where}: {exc} ({hint})")

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the byte budget is enforced before it commits."""
        if self.readonly:
            raise BufferStoreError(f"buffer {self.path} was opened read-only; cannot {what}")
        conn = self.db.conn
        try:
            with write_transaction(conn):
                yield conn
                self._enforce_budget(conn)
        except sqlite3.Error as exc:
            raise self._store_error(what, exc) from exc

    def _rows(self, table: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            return [_decode_row(table, r) for r in self.db.query(sql, params)]
        except sqlite3.Error as exc:
            raise self._store_error(f"read {table}", exc) from exc

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            row = self.db.execute(sql, params).fetchone()
        except sqlite3.Error as exc:
            raise self._store_error("read", exc) from exc
        return None if row is None else row[0]

    # ---------------------------------------------------------- budget

    def used_bytes(self) -> int:
        """Live bytes of the main file: ``(page_count - freelist_count) * page_size``."""
        conn = self.db.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return int(pages - free) * self._page_size

    def _enforce_budget(self, conn: sqlite3.Connection) -> None:
        used = self.used_bytes()
        if used <= self.max_bytes:
            return
        before = used
        target = self.max_bytes - min(int(self.max_bytes * LOW_WATER_FRACTION), MAX_EVICT_BYTES)
        counts: dict[str, int] = {}
        # table -> [first_seq, last_seq, count, passed_count, failed_count] for gap rows
        gaps: dict[str, list[int]] = {}
        for table, wheres, unsynced in _EVICTION_STEPS:
            batch = 32
            while used > target:
                cols = "seq, passed" if table == "results" else "seq, reason = 'fail'" if table == "samples" else "seq, 0"
                picked: list[tuple[int, int]] = []
                for where in wheres:
                    picked += conn.execute(
                        f"SELECT {cols} FROM {table} WHERE {where} ORDER BY seq LIMIT ?", (batch,)
                    ).fetchall()
                if not picked:
                    break
                picked = sorted(picked)[:batch]
                seqs = [s for s, _ in picked]
                conn.execute(f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(seqs))})", seqs)
                self._account(table, unsynced, picked, counts, gaps)
                used = self.used_bytes()
                batch = min(batch * 2, _MAX_EVICT_BATCH)
            if used <= target:
                break
        now = time.time()
        for table_name, (first, last, count, passed, failed) in gaps.items():
            self.db.table("gaps").insert(
                {
                    "ts": now,
                    "table_name": table_name,
                    "first_seq": first,
                    "last_seq": last,
                    "count": count,
                    "passed_count": passed,
                    "failed_count": failed,
                }
            )
        counts["eviction_passes"] = 1
        for name, value in counts.items():
            conn.execute(_BUMP_COUNTER, (name, value))
        self._insert_event(
            "eviction",
            {"bytes_before": before, "bytes_after": used, "max_bytes": self.max_bytes, "evicted": counts},
        )
        # Python's sqlite3 steps a row-less PRAGMA once, and each step of
        # incremental_vacuum returns one page: loop over the free list.
        for _ in range(int(conn.execute("PRAGMA freelist_count").fetchone()[0])):
            conn.execute("PRAGMA incremental_vacuum").close()
        after = self.used_bytes()
        if after > self.max_bytes:
            logger.warning(
                "buffer %s still holds %s bytes over its %s byte budget after evicting everything it may;"
                " raise buffer.max_bytes",
                self.path,
                after,
                self.max_bytes,
            )
        logger.info("buffer eviction: %s -> %s bytes, %s", before, after, counts)

    @staticmethod
    def _account(
        table: str,
        unsynced: bool,
        picked: list[tuple[int, int]],
        counts: dict[str, int],
        gaps: dict[str, list[int]],
    ) -> None:
        def bump(name: str, n: int) -> None:
            if n:
                counts[name] = counts.get(name, 0) + n

        n = len(picked)
        flagged = sum(1 for _, f in picked if f)  # results: passed; samples: reason == 'fail'
        if table == "results":
            if not unsynced:
                bump("evicted_synced", n)
            else:
                bump("evicted_unsynced_pass", flagged)
                bump("evicted_unsynced_fail", n - flagged)
        elif table == "samples":
            bump("evicted_samples", n)
            if unsynced:
                bump("evicted_unsynced_samples", n)
        elif table == "events":
            bump("evicted_events", n)
            if unsynced:
                bump("evicted_unsynced_events", n)
        else:
            bump("evicted_gaps", n)
        if unsynced and table in ("results", "samples"):
            passed, failed = (flagged, n - flagged) if table == "results" else (n - flagged, flagged)
            g = gaps.get(table)
            if g is None:
                gaps[table] = [picked[0][0], picked[-1][0], n, passed, failed]
            else:
                g[0], g[1] = min(g[0], picked[0][0]), max(g[1], picked[-1][0])
                g[2] += n
                g[3] += passed
                g[4] += failed

    # --------------------------------------------------------- writing

    def record_result(self, rec: ResultRecord) -> int:
        """Insert one decision and COMMIT before returning its seq (durable under FULL)."""
        return self.record_results([rec])[0]

    def record_results(
        self,
        recs: Iterable[ResultRecord],
        samples: dict[int, SampleRecord] | None = None,
        *,
        prior_samples: Sequence[SampleRecord] = (),
        events: Sequence[tuple[str, dict[str, Any]]] = (),
        meta: dict[str, str] | None = None,
    ) -> list[int]:
        """Insert several decisions in one transaction (group commit); their seqs in order.

        ``samples`` maps an index into ``recs`` to the JPEG sample of that decision: it is
        written in the same transaction with ``result_seq`` set, so a failed part costs no
        second fsync. ``prior_samples`` are samples of decisions committed earlier (their
        ``result_seq`` set), so a decision need not wait for its JPEG to be encoded.
        Samples that break the rules are dropped with a warning, never the decisions; so
        is a malformed box (the row is kept without it: the cloud would refuse the batch).
        ``events`` (kind, detail) and ``meta`` settings ride in the same transaction too,
        for the same reason. Any of them may come without ``recs``.
        """
        recs = [r if r.box is None else self._box_ok(r) for r in recs]
        if not recs and not events and not meta and not prior_samples:
            return []
        samples = {i: smp for i, smp in (samples or {}).items() if self._sample_ok(smp)}
        prior = [smp for smp in prior_samples if self._sample_ok(smp)]
        started = time.perf_counter()
        try:
            seqs = self._insert_group(recs, samples, prior, events, meta)
        except BufferStoreError as exc:
            # A full disk with rows the cloud already has: their pages are reused in place.
            if not _is_full(exc) or not self.make_room():
                raise
            seqs = self._insert_group(recs, samples, prior, events, meta)
        if recs:
            self.last_record_ms = (time.perf_counter() - started) * 1000.0
        return seqs

    def _insert_group(
        self,
        recs: list[ResultRecord],
        samples: dict[int, SampleRecord],
        prior: list[SampleRecord],
        events: Sequence[tuple[str, dict[str, Any]]],
        meta: dict[str, str] | None,
    ) -> list[int]:
        prev_ms = self.last_record_ms
        seqs: list[int] = []
        with self._write("record results") as conn:
            # A prepared INSERT, not Table.insert(): sqlite-utils re-inspects the
            # table on every call, ~20x the cost of the statement itself.
            for r in recs:
                cur = conn.execute(
                    _INSERT_RESULT,
                    (
                        float(r.ts),
                        r.device_id,
                        r.part_id,
                        r.model_version,
                        r.label,
                        float(r.score),
                        1 if r.passed else 0,
                        r.capture_ms,
                        r.preprocess_ms,
                        r.invoke_ms,
                        prev_ms,
                        *(r.box or _NO_BOX),
                    ),
                )
                seqs.append(int(cur.lastrowid or 0))
            for i, smp in samples.items():
                conn.execute(
                    _INSERT_SAMPLE,
                    (seqs[i], float(smp.ts), smp.reason, smp.label, float(smp.score), smp.width, smp.height, smp.jpeg),
                )
            for smp in prior:
                conn.execute(
                    _INSERT_SAMPLE,
                    (smp.result_seq, float(smp.ts), smp.reason, smp.label, float(smp.score), smp.width, smp.height, smp.jpeg),
                )
            for kind, detail in events:
                self._insert_event(kind, detail)
            for key, value in (meta or {}).items():
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))
        return seqs

    def make_room(self) -> int:
        """On a full disk, evict synced rows (the cloud has them) so the file's pages are reused.

        The file cannot grow, but pages freed inside it take new rows without growing it.
        Frees up to 1/10 of the used bytes (at most ``MAX_EVICT_BYTES``), synced samples
        first, in the budget's order; never an unsynced row. Counted, and recorded as an
        ``eviction`` event with ``reason: disk_full``. Returns the rows evicted (0: none
        to evict, or the disk is too full even for that).
        """
        want = max(16, min(self.used_bytes() // 10, MAX_EVICT_BYTES) // self._page_size)
        counts: dict[str, int] = {}
        try:
            with self._write("make room on a full disk") as conn:
                start_free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                for table, wheres, unsynced in _EVICTION_STEPS:
                    if unsynced:
                        break  # only what the cloud already stored
                    cols = "seq, passed" if table == "results" else "seq, reason = 'fail'" if table == "samples" else "seq, 0"
                    while int(conn.execute("PRAGMA freelist_count").fetchone()[0]) - start_free < want:
                        picked: list[tuple[int, int]] = []
                        for where in wheres:
                            picked += conn.execute(
                                f"SELECT {cols} FROM {table} WHERE {where} ORDER BY seq LIMIT ?", (_MAX_EVICT_BATCH,)
                            ).fetchall()
                        if not picked:
                            break
                        picked = sorted(picked)[:_MAX_EVICT_BATCH]
                        seqs = [q for q, _ in picked]
                        conn.execute(f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(seqs))})", seqs)
                        self._account(table, False, picked, counts, {})
                evicted = sum(v for k, v in counts.items() if k in ("evicted_synced", "evicted_samples", "evicted_events", "evicted_gaps"))
                if evicted:
                    counts["eviction_passes"] = 1
                    for name, value in counts.items():
                        conn.execute(_BUMP_COUNTER, (name, value))
                    self._insert_event("eviction", {"reason": "disk_full", "evicted": counts})
        except BufferStoreError as exc:
            logger.warning("buffer %s: no room even to evict synced rows (%s)", self.path, exc)
            return 0
        if evicted:
            logger.warning(
                "buffer %s: the disk is full; evicted %s synced rows (the cloud has them) to keep recording;"
                " free space on the device", self.path, evicted,
            )
        return evicted

    @staticmethod
    def _box_ok(rec: ResultRecord) -> ResultRecord:
        """The record, without its box when the box is malformed (the decision is kept)."""
        problem = box_problem(rec.box)
        if problem is None:
            return rec
        logger.warning("part %s: %s; recorded without a box", rec.part_id, problem)
        return replace(rec, box=None)

    def _sample_ok(self, rec: SampleRecord) -> bool:
        try:
            self._check_sample(rec)
        except (ValueError, BufferStoreError) as exc:
            self.samples_refused += 1
            logger.warning("sample not kept: %s", exc)
            return False
        return True

    def _check_sample(self, rec: SampleRecord) -> None:
        if not sample_reason_ok(rec.reason):
            raise ValueError(
                f"sample reason {rec.reason!r}; use one of {', '.join(SAMPLE_REASONS)}"
                f" or drift_<{'|'.join(DRIFT_SAMPLE_KINDS)}>:<measures>"
            )
        limit = self.max_bytes // MAX_SAMPLE_FRACTION
        if len(rec.jpeg) > limit:
            raise BufferStoreError(
                f"sample of {len(rec.jpeg)} bytes is over 1/{MAX_SAMPLE_FRACTION} of buffer.max_bytes"
                f" ({self.max_bytes}); lower the sample JPEG size or quality, or raise buffer.max_bytes"
            )

    def record_sample(self, rec: SampleRecord) -> int:
        """Insert one JPEG sample and commit; its seq."""
        self._check_sample(rec)
        with self._write("record a sample") as conn:
            cur = conn.execute(
                _INSERT_SAMPLE,
                (rec.result_seq, float(rec.ts), rec.reason, rec.label, float(rec.score), rec.width, rec.height, rec.jpeg),
            )
            return int(cur.lastrowid or 0)

    def record_event(self, kind: str, **detail: Any) -> int:
        """Insert one event (``detail`` stored as JSON) and commit; its seq."""
        if not kind or not isinstance(kind, str):
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        with self._write(f"record event {kind}"):
            return self._insert_event(kind, detail)

    def _insert_event(self, kind: str, detail: dict[str, Any]) -> int:
        text = json.dumps(detail, default=str, sort_keys=True)
        if len(text) > MAX_EVENT_DETAIL_CHARS:
            text = json.dumps({"truncated": True, "preview": text[:1000]})
        cur = self.db.conn.execute("INSERT INTO events (ts, kind, detail) VALUES (?, ?, ?)", (time.time(), kind, text))
        return int(cur.lastrowid or 0)

    def meta_set(self, key: str, value: str) -> None:
        """Store a small setting (text) and commit."""
        with self._write(f"set {key}"):
            self._meta_put(key, value)

    def _meta_put(self, key: str, value: str) -> None:
        self.db.table("meta").upsert({"key": key, "value": str(value)}, pk="key")

    @property
    def buffer_id(self) -> str | None:
        """The random id this buffer file got when it was created (None: an older file read-only)."""
        return self._meta_read("buffer_id")

    def meta_get(self, key: str, default: str | None = None) -> str | None:
        """A setting stored with :meth:`meta_set`, or ``default``."""
        value = self._meta_read(key)
        return default if value is None else value

    def _meta_read(self, key: str) -> str | None:
        value = self._scalar("SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else str(value)

    # ------------------------------------------------------------ sync

    def pending(self, table: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Unsynced rows of ``table`` with seq > ``after_seq``, in seq order, at most ``limit``."""
        _check_table(table)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return self._rows(
            # "+synced": walk the primary key from the cursor; the eviction index on
            # synced would sort every unsynced row on each call (slow after a week offline)
            table, f"SELECT * FROM {table} WHERE +synced = 0 AND seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        )

    def pending_gaps(self, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Gap records the cloud has not acknowledged yet, oldest first."""
        return self.pending("gaps", after_seq=after_seq, limit=limit)

    def mark_synced(self, table: str, seqs_or_range: Iterable[int] | range) -> int:
        """Mark rows acknowledged by the cloud; returns how many rows changed.

        Takes seqs, or a ``range`` (Python semantics: ``range(5, 10)`` is seqs 5..9).
        """
        _check_table(table)
        changed = 0
        with self._write(f"mark {table} synced") as conn:
            if isinstance(seqs_or_range, range) and seqs_or_range.step == 1:
                cur = conn.execute(
                    f"UPDATE {table} SET synced = 1 WHERE +synced = 0 AND seq >= ? AND seq < ?",
                    (seqs_or_range.start, seqs_or_range.stop),
                )
                return cur.rowcount
            seqs = sorted({int(s) for s in seqs_or_range})
            for i in range(0, len(seqs), _MAX_EVICT_BATCH):
                chunk = seqs[i : i + _MAX_EVICT_BATCH]
                cur = conn.execute(
                    f"UPDATE {table} SET synced = 1 WHERE +synced = 0 AND seq IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                changed += cur.rowcount
        return changed

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: changes whenever another connection commits."""
        return int(self._scalar("PRAGMA data_version"))

    def unsynced_counts(self) -> dict[str, int]:
        """How many rows of each table wait for the cloud."""
        return {t: int(self._scalar(f"SELECT count(*) FROM {t} WHERE synced = 0")) for t in TABLES}

    # ---------------------------------------------------------- status

    def counters(self) -> dict[str, int]:
        """Eviction and recovery counters (every known name, zero if never bumped)."""
        values = dict.fromkeys(COUNTER_NAMES, 0)
        for row in self._rows("counters", "SELECT name, value FROM counters"):
            values[row["name"]] = int(row["value"])
        return values

    def last_seq(self, table: str = "results") -> int:
        """The highest seq ever issued in ``table`` (survives eviction), 0 if none."""
        _check_table(table)
        return int(self._scalar("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)) or 0)

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Several reads from one consistent state of the file (a read transaction)."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise self._store_error("read", exc) from exc
        try:
            yield
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def stats(self) -> dict[str, Any]:
        """Counts, bytes and counters for ``linewatch edge status``, from one snapshot.

        ``results``, ``passed``, ``failed`` and ``unsynced`` count the rows stored now
        (evicted rows are in ``evictions``); ``last_seq`` is the highest seq ever issued.
        """
        with self._snapshot():
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        by_state = {
            (r["synced"], r["passed"]): r["n"]
            for r in self._rows(
                "stats", "SELECT synced, passed, count(*) AS n FROM results GROUP BY synced, passed"
            )
        }
        passed = sum(n for (_, p), n in by_state.items() if p)
        failed = sum(n for (_, p), n in by_state.items() if not p)
        unsynced = sum(n for (s, _), n in by_state.items() if not s)
        last = self.tail(1)
        return {
            "path": str(self.path),
            "device_id": self._meta_read("device_id"),
            "schema_version": schema_version(self.db),
            "results": passed + failed,
            "passed": passed,
            "failed": failed,
            "unsynced": unsynced,
            "samples": int(self._scalar("SELECT count(*) FROM samples")),
            "events": int(self._scalar("SELECT count(*) FROM events")),
            "pending": self.unsynced_counts(),
            "bytes_used": self.used_bytes(),
            "max_bytes": self.max_bytes,
            "file_bytes": _size(self.path),
            "wal_bytes": _size(Path(f"{self.path}-wal")),
            "evictions": self.counters(),
            "last_result": last[0] if last else None,
            "last_seq": self.last_seq("results"),
            "last_record_ms": self.last_record_ms,
        }

    def tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` most recent results, newest last."""
        rows = self._rows("results", "SELECT * FROM results ORDER BY seq DESC LIMIT ?", (max(0, n),))
        return rows[::-1]

    def events_tail(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` most recent events, newest last (``detail`` decoded from JSON)."""
        rows = self._rows("events", "SELECT * FROM events ORDER BY seq DESC LIMIT ?", (max(0, n),))
        return rows[::-1]

    # --------------------------------------------------------- closing

    def close(self) -> None:
        """Close the connection (the last one to close checkpoints the WAL)."""
        if not self._closed and hasattr(self, "db"):
            self._closed = True
            if self.checkpointer is not None:
                self.checkpointer.stop()  # before the last connection closes (and checkpoints)
            self.db.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.readonly else f"{self.synchronous}, max_bytes={self.max_bytes}"
        return f"<Buffer {self.path} ({mode})>"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
