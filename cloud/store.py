"""The cloud store: what devices sent, stored once per (device_id, seq), and the fleet's state.

Ingest talks to a :class:`Store` (a Protocol, so PostgreSQL can follow); :class:`SQLiteStore`
is the implementation: one SQLite file through sqlite-utils, WAL, so several ingest
workers (processes) write to it side by side and readers (``cloud fleet``) never block them.

Guarantees ingest relies on:

- Every ``store_*`` call is ONE transaction; it returns only after COMMIT, and the ack is
  published only after that return. A ``kill -9`` at any moment loses nothing acked.
- Rows are inserted with ``INSERT OR IGNORE`` on the primary key (device_id, seq): a resent
  batch stores nothing twice and is acked again.
- Per-device totals (results, samples, gaps, evicted, ...) move in the same transaction as
  the rows they count, so they are exact.

Sample images are files under ``<data_dir>/samples/<device_id>/<seq>.jpg`` (temp file, fsync,
rename, fsync of the folder) with an index row ready for labelling (``labelled_as``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from cloud.exceptions import StoreError
from edge.fsutil import atomic_write
from edge.protocol import (
    EVENTS,
    GAPS,
    RESULTS,
    SAMPLES,
    EventsBatch,
    GapsBatch,
    ResultsBatch,
    SampleChunk,
    StatusPayload,
    seq_ranges,
)
from edge.sqlite import Migration, NamedLedger, run_migrations, write_transaction

logger = logging.getLogger(__name__)

DEVICE_STATES = ("online", "offline_buffering", "dead")
_BOX_COLS = ("box_x", "box_y", "box_w", "box_h")  # the deciding tile's box, NULL without one
_RESULT_COLS = ("seq", "ts", "part_id", "model_version", "label", "score", "passed",
                "capture_ms", "preprocess_ms", "invoke_ms", "record_ms", "received", *_BOX_COLS)  # fmt: skip
_NO_BOX = (None, None, None, None)
_INSERT_GAP = (
    "INSERT OR IGNORE INTO gaps (device_id, buffer_id, seq, ts, table_name, first_seq, last_seq, count, passed_count,"
    " failed_count, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True)
class StoreOutcome:
    """What one store call did: the seq ranges now safely stored (to ack) and the row counts."""

    acked: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    inserted: int = 0
    duplicates: int = 0
    problem: str | None = None  # a counter name when the call stored nothing on purpose
    conflicts: int = 0  # rows whose key was taken by a different row: kept aside in ``conflicts``


class Store(Protocol):
    """What ingest and the fleet commands need from a store (SQLite today)."""

    def store_results(self, batch: ResultsBatch, *, received: float) -> StoreOutcome:
        """Insert a results batch idempotently, in one transaction."""
        ...

    def store_gaps(self, batch: GapsBatch, *, received: float) -> StoreOutcome:
        """Insert gap records (evictions on the device) idempotently."""
        ...

    def store_events(self, batch: EventsBatch, *, received: float) -> StoreOutcome:
        """Insert agent events idempotently."""
        ...

    def store_sample_chunk(self, chunk: SampleChunk, data: bytes, *, received: float) -> StoreOutcome:
        """Keep one chunk; when the sample is complete, write its file and index row."""
        ...

    def record_status(self, status: StatusPayload, *, received: float, retained: bool) -> None:
        """Update the device table from a status message (or a last will)."""
        ...

    def add_counters(self, counts: dict[str, int]) -> None:
        """Add to named counters (rejected payloads and the like)."""
        ...

    def counters(self) -> dict[str, int]:
        """Every counter by name."""
        ...

    def fleet(self, *, now: float, offline_after_s: float, dead_after_s: float) -> list[dict[str, Any]]:
        """One dict per device with its computed state."""
        ...

    def results(self, device_id: str, *, limit: int = 100, after_seq: int = 0) -> list[dict[str, Any]]:
        """Stored results of one device in seq order."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...


def device_state(
    *, now: float, last_seen: float | None, status_seen: float | None, reported_state: str | None,
    offline_after_s: float, dead_after_s: float,
) -> str:
    """online, offline_buffering or dead (see docs/sync.md, "Fleet states")."""
    if last_seen is None or now - last_seen > dead_after_s:
        return "dead"
    if reported_state != "online" or status_seen is None or now - status_seen > offline_after_s:
        return "offline_buffering"
    return "online"


def identity_state(buffers: list[dict[str, Any]], conflicts: int) -> str:
    """``ok``, ``new_buffer`` or ``conflict`` for a device's buffer incarnations (oldest first).

    ``new_buffer``: the device sent from more than one buffer, one after the other (a
    re-imaged box, a new disk, an agent upgraded to send buffer ids, a damaged buffer set
    aside). ``conflict``: two buffers sent at overlapping times (one device id on two
    boxes) or rows with one key but different content arrived (a cloned disk); the rows
    are kept apart (``conflicts`` table, ``linewatch cloud conflicts``).
    """
    if conflicts:
        return "conflict"
    latest_end = None
    for b in buffers:
        if latest_end is not None and b["first_seen"] < latest_end:
            return "conflict"
        latest_end = b["last_seen"] if latest_end is None else max(latest_end, b["last_seen"])
    return "new_buffer" if len(buffers) > 1 else "ok"


# -- schema ---------------------------------------------------------------------------------


def _m001_initial(db: sqlite_utils.Database) -> None:
    db.create_table(
        "results",
        {"device_id": str, "seq": int, "ts": float, "part_id": int, "model_version": str, "label": str,
         "score": float, "passed": int, "capture_ms": float, "preprocess_ms": float, "invoke_ms": float,
         "record_ms": float, "received": float},
        pk=("device_id", "seq"), not_null=["device_id", "seq"],
    )  # fmt: skip
    db.create_table(
        "gaps",
        {"device_id": str, "seq": int, "ts": float, "table_name": str, "first_seq": int, "last_seq": int,
         "count": int, "passed_count": int, "failed_count": int, "received": float},
        pk=("device_id", "seq"), not_null=["device_id", "seq"],
    )  # fmt: skip
    db.create_table(
        "events",
        {"device_id": str, "seq": int, "ts": float, "kind": str, "detail": str, "received": float},
        pk=("device_id", "seq"), not_null=["device_id", "seq"],
    )
    db.create_table(
        "samples",
        {"device_id": str, "seq": int, "result_seq": int, "ts": float, "reason": str, "label": str,
         "score": float, "width": int, "height": int, "bytes": int, "sha256": str, "path": str,
         "labelled_as": str, "labelled_at": float, "received": float},
        pk=("device_id", "seq"), not_null=["device_id", "seq"],
    )  # fmt: skip
    db.create_table(
        "sample_chunks",
        {"device_id": str, "seq": int, "chunk": int, "chunks": int, "data": bytes, "received": float},
        pk=("device_id", "seq", "chunk"),
    )
    db.create_table(
        "devices",
        {"device_id": str, "reported_state": str, "status": str, "status_seen": float, "last_seen": float,
         "first_seen": float, "model_version": str, "backlog": int, "groups": str, "offline_reason": str,
         "results": int, "samples": int, "events": int, "gaps": int, "evicted": int},
        pk="device_id", defaults={"results": 0, "samples": 0, "events": 0, "gaps": 0, "evicted": 0},
    )  # fmt: skip
    db.create_table("counters", {"name": str, "value": int, "updated": float}, pk="name")
    db.table("samples").create_index(["labelled_as"])


def _m002_result_box(db: sqlite_utils.Database) -> None:
    # ADD COLUMN only edits the schema: instant on a large store; old rows read NULL (no box).
    for col in _BOX_COLS:
        db.execute(f"ALTER TABLE results ADD COLUMN {col} INTEGER")


def _m003_result_minutes(db: sqlite_utils.Database) -> None:
    # Passes and fails per device per minute of capture time, kept in the same transaction
    # as the results: the fleet page's "pass rate, last hour" and the device chart read a
    # few rows per device instead of scanning every result.
    db.create_table(
        "result_minutes", {"device_id": str, "minute": int, "passed": int, "failed": int},
        pk=("device_id", "minute"), defaults={"passed": 0, "failed": 0},
    )  # fmt: skip
    db.table("result_minutes").create_index(["minute"])
    db.execute(
        "INSERT INTO result_minutes (device_id, minute, passed, failed) SELECT device_id, CAST(ts / 60 AS INTEGER),"
        " sum(passed), count(*) - sum(passed) FROM results GROUP BY 1, 2"
    )


def _m004_buffer_incarnation(db: sqlite_utils.Database) -> None:
    # Rows are keyed on (device_id, buffer_id, seq): a re-imaged box starts seq at 1 again
    # under a new buffer id. Rows stored before this migration (and from older agents,
    # which send no buffer id) keep buffer_id ''.
    for table, pk in (("results", ("device_id", "buffer_id", "seq")), ("gaps", ("device_id", "buffer_id", "seq")),
                      ("events", ("device_id", "buffer_id", "seq")), ("samples", ("device_id", "buffer_id", "seq")),
                      ("sample_chunks", ("device_id", "buffer_id", "seq", "chunk"))):  # fmt: skip
        db.execute(f"ALTER TABLE {table} ADD COLUMN buffer_id TEXT NOT NULL DEFAULT ''")
        # transform_sql, not transform: transform would commit the migration's transaction.
        for sql in db.table(table).transform_sql(pk=pk):
            db.execute(sql)
    db.execute("CREATE INDEX IF NOT EXISTS idx_samples_labelled_as ON samples (labelled_as)")
    db.execute("ALTER TABLE devices ADD COLUMN buffer_id TEXT")
    db.create_table(
        "buffers",
        {"device_id": str, "buffer_id": str, "first_seen": float, "last_seen": float, "rows": int},
        pk=("device_id", "buffer_id"), defaults={"rows": 0},
    )  # fmt: skip
    db.create_table(
        "conflicts",
        {"id": int, "device_id": str, "buffer_id": str, "table_name": str, "seq": int, "row": str,
         "stored": str, "received": float},
        pk="id",
    )  # fmt: skip
    db.table("conflicts").create_index(["device_id"])


# Registered migrations, applied in order, each in its own transaction with its own record.
MIGRATIONS: list[Migration] = [
    Migration("001_initial", _m001_initial),
    Migration("002_result_box", _m002_result_box),
    Migration("003_result_minutes", _m003_result_minutes),
    Migration("004_buffer_incarnation", _m004_buffer_incarnation),
]

# What makes two rows with one key the same row (a resend), per table; anything else with
# an existing key is a conflict (a cloned buffer) and is kept aside in ``conflicts``.
_SAME_ROW = {
    RESULTS: ("ts", "part_id", "label", "passed"),
    GAPS: ("ts", "table_name", "first_seq", "last_seq"),
    EVENTS: ("ts", "kind"),
    SAMPLES: ("sha256",),
}


class SQLiteStore:
    """:class:`Store` on one SQLite file (WAL); one instance per thread."""

    def __init__(
        self, path: Path, *, samples_dir: Path, synchronous: str = "FULL", busy_timeout_s: float = 30.0,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.samples_dir = Path(samples_dir)
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"{self.path}: no cloud store here yet; start `linewatch cloud serve` or pass --config")
                conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None, timeout=busy_timeout_s)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=busy_timeout_s)
            conn.row_factory = sqlite3.Row
            self.db = sqlite_utils.Database(conn, execute_plugins=False)
            if not readonly:
                self._prepare(conn, synchronous, busy_timeout_s)
            elif not self.db["results"].exists():
                raise StoreError(f"{self.path} is not a Linewatch cloud store (no results table)")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the cloud store ({exc}); check the path and its permissions") from exc
        self.conn = conn

    def _prepare(self, conn: sqlite3.Connection, synchronous: str, busy_timeout_s: float) -> None:
        """WAL mode and the schema, retried while another process does the same.

        Switching a new database to WAL takes an exclusive lock, and SQLite answers
        "database is locked" at once, without its busy handler, when two workers start
        on the same file together; the second one waits here instead.
        """
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
                self._migrate()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                time.sleep(0.05)

    # -- plumbing ----------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so concurrent workers queue on busy_timeout."""
        return write_transaction(self.db.conn)

    def _migrate(self) -> None:
        run_migrations(self.db, MIGRATIONS, NamedLedger(), what=f"cloud store {self.path}")

    @staticmethod
    def _touch(conn: sqlite3.Connection, device_id: str, seen: float, **add: int) -> None:
        """Refresh last_seen and add to the device's totals (inside the caller's transaction)."""
        conn.execute(
            "INSERT OR IGNORE INTO devices (device_id, first_seen, last_seen) VALUES (?, ?, ?)", (device_id, seen, seen)
        )
        sets = "".join(f", {k} = {k} + :{k}" for k in add)
        conn.execute(
            f"UPDATE devices SET last_seen = max(coalesce(last_seen, 0), :t){sets} WHERE device_id = :d",
            {"d": device_id, "t": seen, **add},
        )

    @staticmethod
    def _count_minutes(conn: sqlite3.Connection, device_id: str, ts_passed: list[tuple[float, int]]) -> None:
        """Add new results to their device's per-minute pass/fail counts (caller's transaction)."""
        per_minute: dict[int, list[int]] = {}
        for ts, passed in ts_passed:
            counts = per_minute.setdefault(int(ts // 60), [0, 0])
            counts[0 if passed else 1] += 1
        conn.executemany(
            "INSERT INTO result_minutes (device_id, minute, passed, failed) VALUES (?, ?, ?, ?) ON CONFLICT(device_id, minute)"
            " DO UPDATE SET passed = passed + excluded.passed, failed = failed + excluded.failed",
            [(device_id, minute, p, f) for minute, (p, f) in per_minute.items()],
        )

    @staticmethod
    def _insert_rows(
        conn: sqlite3.Connection, table: str, columns: tuple[str, ...], device_id: str, buffer_id: str,
        rows: list[tuple[Any, ...]],
    ) -> int:
        """INSERT OR IGNORE (device_id, buffer_id, *row) into ``columns`` for each row; how many were new."""
        if not rows:
            return 0
        before = conn.total_changes
        conn.executemany(
            f"INSERT OR IGNORE INTO {table} (device_id, buffer_id, {', '.join(columns)})"
            f" VALUES ({', '.join('?' * (len(columns) + 2))})",
            [(device_id, buffer_id, *r) for r in rows],
        )
        return conn.total_changes - before

    @staticmethod
    def _sort_out(
        conn: sqlite3.Connection, table: str, device_id: str, buffer_id: str, rows: list[dict[str, Any]], received: float,
    ) -> tuple[list[dict[str, Any]], int, int]:
        """Split a batch's rows (dicts with ``seq``, in seq order) into (new rows, duplicates, conflicts).

        A row whose key exists with the same content is a resend (a duplicate). With other
        content it is a conflict: two buffers with one id (a cloned disk). It is written to
        ``conflicts`` (kept, reported, acked) and the stored row stays. An agent upgraded to
        send a buffer id resends rows the cloud stored without one (buffer_id ''): those
        count as duplicates too.
        """
        if not rows:
            return [], 0, 0
        same = _SAME_ROW[table]
        existing: dict[int, tuple[Any, ...]] = {}
        legacy: dict[int, tuple[Any, ...]] = {}
        sql = (f"SELECT buffer_id, seq, {', '.join(same)} FROM {table}"
               " WHERE device_id = ? AND buffer_id IN (?, '') AND seq BETWEEN ? AND ?")  # fmt: skip
        for r in conn.execute(sql, (device_id, buffer_id, rows[0]["seq"], rows[-1]["seq"])):
            (existing if r[0] == buffer_id else legacy)[r[1]] = tuple(r[2:])
        fresh: list[dict[str, Any]] = []
        duplicates = conflicts = 0
        for row in rows:
            key = tuple(row.get(c) for c in same)
            stored = existing.get(row["seq"])
            if stored is None and legacy.get(row["seq"]) != key:
                fresh.append(row)
            elif stored is None or stored == key:
                duplicates += 1
            else:
                conflicts += 1
                conn.execute(
                    "INSERT INTO conflicts (device_id, buffer_id, table_name, seq, row, stored, received)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (device_id, buffer_id, table, row["seq"], json.dumps(row, default=str),
                     json.dumps(dict(zip(same, stored, strict=True)), default=str), received),
                )  # fmt: skip
        return fresh, duplicates, conflicts

    @staticmethod
    def _note_buffer(conn: sqlite3.Connection, device_id: str, buffer_id: str, seen: float, rows: int) -> None:
        """Keep the device's buffer incarnations: when each was first and last heard from."""
        conn.execute(
            "INSERT INTO buffers (device_id, buffer_id, first_seen, last_seen, rows) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(device_id, buffer_id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen),"
            " rows = rows + excluded.rows",
            (device_id, buffer_id, seen, seen, rows),
        )

    # -- writes --------------------------------------------------------------------------------

    def store_results(self, batch: ResultsBatch, *, received: float) -> StoreOutcome:
        c = batch.cols
        boxes = c.box if c.box is not None else [None] * len(batch.seq)
        buffer_id = batch.buffer_id or ""
        rows = [
            {"seq": s, "ts": ts, "part_id": part, "model_version": mv, "label": label, "score": score, "passed": int(ok),
             "capture_ms": cap, "preprocess_ms": pre, "invoke_ms": inv, "record_ms": rec, "received": received,
             "box": box}
            for s, ts, part, mv, label, score, ok, cap, pre, inv, rec, box in zip(
                batch.seq, c.ts, c.part_id, c.model_version, c.label, c.score, c.passed, c.capture_ms,
                c.preprocess_ms, c.invoke_ms, c.record_ms, boxes, strict=True)
        ]  # fmt: skip
        with self._write() as conn:
            fresh, duplicates, conflicts = self._sort_out(conn, RESULTS, batch.device_id, buffer_id, rows, received)
            values = [(*(r[k] for k in _RESULT_COLS[:12]), *(r["box"] or _NO_BOX)) for r in fresh]
            inserted = self._insert_rows(conn, "results", _RESULT_COLS, batch.device_id, buffer_id, values)
            self._note_buffer(conn, batch.device_id, buffer_id, received, inserted)
            # per-minute pass/fail counts of the rows new to the store (a resend counts nothing)
            self._count_minutes(conn, batch.device_id, [(r["ts"], r["passed"]) for r in fresh])
            self._touch(conn, batch.device_id, received, results=inserted)
        return StoreOutcome({RESULTS: seq_ranges(batch.seq)}, inserted, duplicates + len(fresh) - inserted, conflicts=conflicts)

    def store_gaps(self, batch: GapsBatch, *, received: float) -> StoreOutcome:
        c = batch.cols
        buffer_id = batch.buffer_id or ""
        rows = [
            {"seq": s, "ts": ts, "table_name": t, "first_seq": a, "last_seq": b, "count": n, "passed_count": p,
             "failed_count": f}
            for s, ts, t, a, b, n, p, f in zip(batch.seq, c.ts, c.table_name, c.first_seq, c.last_seq, c.count,
                                                c.passed_count, c.failed_count, strict=True)
        ]  # fmt: skip
        inserted = evicted = 0
        with self._write() as conn:
            fresh, duplicates, conflicts = self._sort_out(conn, GAPS, batch.device_id, buffer_id, rows, received)
            for r in fresh:
                cur = conn.execute(_INSERT_GAP, (batch.device_id, buffer_id, *r.values(), received))
                if cur.rowcount == 1:
                    inserted += 1
                    evicted += int(r["count"] or 0)
            self._note_buffer(conn, batch.device_id, buffer_id, received, 0)
            self._touch(conn, batch.device_id, received, gaps=inserted, evicted=evicted)
        return StoreOutcome({GAPS: seq_ranges(batch.seq)}, inserted, duplicates + len(fresh) - inserted, conflicts=conflicts)

    def store_events(self, batch: EventsBatch, *, received: float) -> StoreOutcome:
        c = batch.cols
        buffer_id = batch.buffer_id or ""
        rows = [
            {"seq": s, "ts": ts, "kind": kind, "detail": json.dumps(d, separators=(",", ":"), default=str), "received": received}
            for s, ts, kind, d in zip(batch.seq, c.ts, c.kind, c.detail, strict=True)
        ]
        with self._write() as conn:
            fresh, duplicates, conflicts = self._sort_out(conn, EVENTS, batch.device_id, buffer_id, rows, received)
            inserted = self._insert_rows(conn, "events", ("seq", "ts", "kind", "detail", "received"), batch.device_id,
                                         buffer_id, [tuple(r.values()) for r in fresh])  # fmt: skip
            self._note_buffer(conn, batch.device_id, buffer_id, received, 0)
            self._touch(conn, batch.device_id, received, events=inserted)
        return StoreOutcome({EVENTS: seq_ranges(batch.seq)}, inserted, duplicates + len(fresh) - inserted, conflicts=conflicts)

    def sample_path(self, device_id: str, seq: int, buffer_id: str = "") -> Path:
        """Where a sample's JPEG goes: ``<device>/<seq>.jpg``, under ``<device>/<buffer_id>/`` when known."""
        folder = self.samples_dir / device_id
        return (folder / buffer_id if buffer_id else folder) / f"{seq}.jpg"

    def store_sample_chunk(self, chunk: SampleChunk, data: bytes, *, received: float) -> StoreOutcome:
        dev, seq, buffer_id = chunk.device_id, chunk.seq, chunk.buffer_id or ""
        done = StoreOutcome({SAMPLES: [(seq, seq)]}, 0, 1)
        with self._write() as conn:
            stored = conn.execute(
                "SELECT buffer_id, sha256 FROM samples WHERE device_id = ? AND buffer_id IN (?, '') AND seq = ?"
                " ORDER BY buffer_id = ? DESC", (dev, buffer_id, seq, buffer_id),
            ).fetchone()  # fmt: skip
            if stored is not None and stored["sha256"] == chunk.sha256:
                self._touch(conn, dev, received)
                return done
            conn.execute(
                "INSERT OR IGNORE INTO sample_chunks (device_id, buffer_id, seq, chunk, chunks, data, received)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dev, buffer_id, seq, chunk.chunk, chunk.chunks, data, received),
            )
            parts = conn.execute(
                "SELECT chunk, data FROM sample_chunks WHERE device_id = ? AND buffer_id = ? AND seq = ? AND chunks = ?"
                " ORDER BY chunk", (dev, buffer_id, seq, chunk.chunks),
            ).fetchall()  # fmt: skip
            if len(parts) < chunk.chunks:
                self._touch(conn, dev, received)
                return StoreOutcome()
            jpeg = b"".join(bytes(p["data"]) for p in parts)
            conn.execute("DELETE FROM sample_chunks WHERE device_id = ? AND buffer_id = ? AND seq = ?", (dev, buffer_id, seq))
            if len(jpeg) != chunk.bytes or hashlib.sha256(jpeg).hexdigest() != chunk.sha256:
                # Chunks of different sends mixed up: drop them all (committed, no ack); the
                # device resends the whole sample after its ack timeout.
                self._touch(conn, dev, received)
                return StoreOutcome(problem="sample_checksum")
            meta = {"seq": seq, "result_seq": chunk.result_seq, "ts": chunk.ts, "reason": chunk.reason,
                    "label": chunk.label, "score": chunk.score, "width": chunk.width, "height": chunk.height,
                    "bytes": chunk.bytes, "sha256": chunk.sha256}  # fmt: skip
            if stored is not None and stored["buffer_id"] == buffer_id:
                # Same key, another image (a cloned buffer): keep it aside, reported, acked.
                aside = self.samples_dir / dev / "conflicts" / f"{buffer_id or 'none'}-{seq}-{chunk.sha256[:12]}.jpg"
                _write_file_durably(aside, jpeg)
                conn.execute(
                    "INSERT INTO conflicts (device_id, buffer_id, table_name, seq, row, stored, received) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (dev, buffer_id, SAMPLES, seq, json.dumps({**meta, "file": str(aside.relative_to(self.samples_dir))}),
                     json.dumps({"sha256": stored["sha256"]}), received),
                )  # fmt: skip
                self._touch(conn, dev, received)
                return StoreOutcome({SAMPLES: [(seq, seq)]}, 0, 0, conflicts=1)
            path = self.sample_path(dev, seq, buffer_id)
            _write_file_durably(path, jpeg)
            conn.execute(
                "INSERT OR IGNORE INTO samples (device_id, buffer_id, seq, result_seq, ts, reason, label, score, width,"
                " height, bytes, sha256, path, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (dev, buffer_id, *meta.values(), str(path.relative_to(self.samples_dir)), received),
            )  # fmt: skip
            self._note_buffer(conn, dev, buffer_id, received, 0)
            self._touch(conn, dev, received, samples=1)
        return StoreOutcome({SAMPLES: [(seq, seq)]}, 1, 0)

    def record_status(self, status: StatusPayload, *, received: float, retained: bool) -> None:
        # A retained status is old news replayed by the broker: it tells the state, not that
        # the device was heard from now.
        seen = (status.ts if status.ts is not None else None) if retained else received
        body = json.dumps(status.model_dump(mode="json"), separators=(",", ":"), default=str)
        online = status.state == "online"
        with self._write() as conn:
            if status.buffer_id is not None and not retained:
                # Heartbeats keep each buffer's last-seen current: two boxes with one device id
                # then show as two buffers alive at the same time (identity "conflict").
                self._note_buffer(conn, status.device_id, status.buffer_id, received, 0)
            row = conn.execute("SELECT last_seen, status_seen FROM devices WHERE device_id = ?", (status.device_id,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO devices (device_id, first_seen) VALUES (?, ?)", (status.device_id, received))
                last_seen, status_seen = None, None
            else:
                last_seen, status_seen = row["last_seen"], row["status_seen"]
            if retained and status_seen is not None and seen is not None and seen < status_seen:
                return  # we already know something newer
            fields: dict[str, Any] = {"reported_state": status.state, "status": body}
            if seen is not None:
                fields["last_seen"] = max(last_seen or 0.0, seen)
                fields["status_seen"] = seen
            if status.model_version is not None:
                fields["model_version"] = status.model_version
            if status.unsynced is not None:
                fields["backlog"] = status.unsynced
            if status.groups is not None:
                fields["groups"] = json.dumps(status.groups)
            if status.buffer_id is not None:
                fields["buffer_id"] = status.buffer_id
            fields["offline_reason"] = None if online else (status.reason or "lost")
            sets = ", ".join(f"{k} = :{k}" for k in fields)
            conn.execute(f"UPDATE devices SET {sets} WHERE device_id = :device_id", {**fields, "device_id": status.device_id})

    def add_counters(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        now = time.time()
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO counters (name, value, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value, updated = excluded.updated",
                [(k, v, now) for k, v in counts.items()],
            )

    # -- reads ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        return {r["name"]: int(r["value"]) for r in self.db.conn.execute("SELECT name, value FROM counters ORDER BY name")}

    def fleet(self, *, now: float, offline_after_s: float, dead_after_s: float) -> list[dict[str, Any]]:
        buffers: dict[str, list[dict[str, Any]]] = {}
        for b in self.db.conn.execute("SELECT * FROM buffers ORDER BY device_id, first_seen"):
            buffers.setdefault(b["device_id"], []).append(dict(b))
        conflicts = dict(self.db.conn.execute("SELECT device_id, count(*) FROM conflicts GROUP BY device_id").fetchall())
        out = []
        for r in self.db.conn.execute("SELECT * FROM devices ORDER BY device_id"):
            incarnations = buffers.get(r["device_id"], [])
            n_conflicts = int(conflicts.get(r["device_id"], 0))
            out.append(
                {
                    "device_id": r["device_id"],
                    "state": device_state(
                        now=now, last_seen=r["last_seen"], status_seen=r["status_seen"], reported_state=r["reported_state"],
                        offline_after_s=offline_after_s, dead_after_s=dead_after_s,
                    ),
                    "reported_state": r["reported_state"],
                    "offline_reason": r["offline_reason"],
                    "results": r["results"],
                    "samples": r["samples"],
                    "events": r["events"],
                    "gaps": r["gaps"],
                    "evicted": r["evicted"],
                    "model_version": r["model_version"],
                    "backlog": r["backlog"],
                    "groups": json.loads(r["groups"]) if r["groups"] else [],
                    "last_seen": r["last_seen"],
                    "last_seen_s_ago": None if r["last_seen"] is None else round(now - r["last_seen"], 1),
                    "first_seen": r["first_seen"],
                    # the device's own drift report from its last status (docs/sync.md, "Drift")
                    "drift": _status_drift(r["status"]),
                    "buffer_id": r["buffer_id"] or (incarnations[-1]["buffer_id"] if incarnations else None),
                    "identity": identity_state(incarnations, n_conflicts),
                    "buffers": [{k: b[k] for k in ("buffer_id", "first_seen", "last_seen", "rows")} for b in incarnations],
                    "conflicts": n_conflicts,
                }
            )
        return out

    def conflicts(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Rows kept aside because their key was taken by a different row, oldest first."""
        sql = "SELECT * FROM conflicts" + (" WHERE device_id = ?" if device_id else "") + " ORDER BY id"
        return [dict(r) for r in self.db.conn.execute(sql, (device_id,) if device_id else ())]

    def results(self, device_id: str, *, limit: int = 100, after_seq: int = 0) -> list[dict[str, Any]]:
        rows = self.db.conn.execute(
            "SELECT * FROM results WHERE device_id = ? AND seq > ? ORDER BY seq LIMIT ?", (device_id, after_seq, limit)
        ).fetchall()
        return [_result_row(dict(r)) for r in rows]

    def gaps(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Gap records (evictions on devices), oldest first."""
        if device_id is None:
            rows = self.db.conn.execute("SELECT * FROM gaps ORDER BY device_id, seq").fetchall()
        else:
            rows = self.db.conn.execute("SELECT * FROM gaps WHERE device_id = ? ORDER BY seq", (device_id,)).fetchall()
        return [dict(r) for r in rows]

    def samples(
        self, device_id: str | None = None, *, since: float | None = None, until: float | None = None,
        reason: str | None = None, limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Sample index rows, with the absolute file path, oldest first per device.

        ``since``/``until`` bound the part's time (inclusive); ``reason`` matches the reason
        or its start, so ``drift`` finds every ``drift_<kind>:<measures>`` sample.
        """
        where: list[str] = []
        args: list[Any] = []
        if device_id:
            where.append("device_id = ?")
            args.append(device_id)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        if reason:
            where.append("substr(reason, 1, ?) = ?")
            args += [len(reason), reason]
        sql = "SELECT * FROM samples" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY device_id, seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        rows = self.db.conn.execute(sql, args).fetchall()
        return [{**dict(r), "file": str(self.samples_dir / r["path"])} for r in rows]

    def drift_history(self, device_id: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Drift state changes the devices reported (``drift_state`` events), oldest first."""
        sql = "SELECT device_id, seq, ts, detail FROM events WHERE kind = 'drift_state'"
        args: list[Any] = []
        if device_id:
            sql += " AND device_id = ?"
            args.append(device_id)
        sql += " ORDER BY ts, device_id, seq LIMIT ?"
        args.append(limit)
        out = []
        for r in self.db.conn.execute(sql, args).fetchall():
            try:
                detail = json.loads(r["detail"]) if r["detail"] else {}
            except ValueError:
                detail = {}
            detail = detail if isinstance(detail, dict) else {}
            out.append({"device_id": r["device_id"], "seq": r["seq"], "ts": r["ts"], "state": detail.get("state"),
                        "previous": detail.get("previous"), "reasons": detail.get("reasons") or [],
                        "why": detail.get("why"), "model_version": detail.get("model_version"),
                        "measures": detail.get("measures") or {}})
        return out

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_drift(body: str | None) -> dict[str, Any] | None:
    """The ``drift`` object of a stored status message, or None (older agents, no status yet)."""
    try:
        drift = json.loads(body).get("drift") if body else None
    except (ValueError, AttributeError):
        return None
    return drift if isinstance(drift, dict) else None


def _result_row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored result as readers see it: ``passed`` a bool, ``box`` [x, y, w, h] or None."""
    row["passed"] = bool(row["passed"])
    box = [row.pop(col, None) for col in _BOX_COLS]
    row["box"] = None if box[0] is None else box
    return row


def _write_file_durably(path: Path, data: bytes) -> None:
    """A sample file, whole or absent after a crash (edge/fsutil.py ``atomic_write``), in a
    folder made on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def open_store(config: Any, *, readonly: bool = False) -> SQLiteStore:
    """The store a :class:`cloud.config.CloudConfig` names."""
    return SQLiteStore(
        config.store.path,
        samples_dir=config.samples_dir,
        synchronous=config.store.synchronous,
        busy_timeout_s=config.store.busy_timeout_s,
        readonly=readonly,
    )
