"""The agent's durable SQLite buffer (:class:`Buffer`): every decision, before it goes anywhere.

How it keeps rows (durability, byte budget, full disk, checkpoints, threads, corruption)
is in docs/buffer.md; the tables are in :mod:`edge.buffer.schema`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from edge.buffer.checkpoint import BACKSTOP_FACTOR, Checkpointer, CheckpointMode
from edge.buffer.errors import is_corruption, is_full, store_error
from edge.buffer.eviction import MAX_EVICT_BYTES, enforce_budget, evict_synced, used_bytes
from edge.buffer.records import (
    DRIFT_SAMPLE_KINDS,
    SAMPLE_REASONS,
    ResultRecord,
    SampleRecord,
    sample_reason_ok,
)
from edge.buffer.recovery import (
    IntegrityMode,
    Recovery,
    check_integrity,
    record_recovery,
    set_aside,
)
from edge.buffer.schema import (
    COUNTER_NAMES,
    INSERT_RESULT,
    INSERT_SAMPLE,
    MAX_SEQS_PER_STATEMENT,
    NO_BOX,
    TABLES,
    check_table,
    decode_row,
    insert_event,
    migrate,
    schema_version,
)
from edge.exceptions import BufferStoreError
from edge.protocol import box_problem
from edge.sqlite import write_transaction

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 200_000_000
# Below this the schema, its indexes and a few rows cannot fit.
MIN_MAX_BYTES = 64 * 1024
# One JPEG sample may use at most this fraction of the budget.
MAX_SAMPLE_FRACTION = 8
SYNCHRONOUS_MODES = ("FULL", "NORMAL")


class Buffer:
    """The agent's durable SQLite buffer (docs/buffer.md).

    ``path`` is created with its folder if missing. ``max_bytes`` is the byte budget
    (every Buffer opened on one file should get the same value, from
    ``buffer.max_bytes``); ``synchronous`` is FULL or NORMAL; ``device_id`` is kept in
    ``meta``; ``busy_timeout_s`` is how long a write waits for another writer;
    ``integrity_check`` is ``auto`` (full check up to 64 MiB, quick above), ``full``,
    ``quick`` or ``off``; ``checkpoint`` is ``auto`` (SQLite checkpoints inside the
    commit that fills the WAL) or ``background`` (a :class:`Checkpointer` thread does
    it, docs/buffer.md). After opening, :attr:`recovery` is set if the file
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
                    reason = check_integrity(conn, self.path, size, integrity)
                if reason is None:
                    db = Database(conn, recursive_triggers=False, execute_plugins=False)
                    self._configure_new(conn)
                    migrate(db)
                    return db
            except sqlite3.Error as exc:
                if attempt == 2 or not is_corruption(exc):
                    conn.close()
                    raise self._store_error("open", exc) from exc
                reason = f"{type(exc).__name__}: {exc}"
            except BaseException:
                conn.close()
                raise
            conn.close()
            self.recovery = set_aside(self.path, reason)
        raise AssertionError("unreachable")  # pragma: no cover

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
            record_recovery(conn, rec)

    # ----------------------------------------------------- transactions

    def _store_error(self, what: str, exc: sqlite3.Error) -> BufferStoreError:
        return store_error(self.path, self.busy_timeout_s, what, exc)

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
            return [decode_row(table, r) for r in self.db.query(sql, params)]
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
        return used_bytes(self.db.conn, self._page_size)

    def _enforce_budget(self, conn: sqlite3.Connection) -> None:
        enforce_budget(conn, max_bytes=self.max_bytes, page_size=self._page_size, path=self.path)

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
            if not is_full(exc) or not self.make_room():
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
                    INSERT_RESULT,
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
                        *(r.box or NO_BOX),
                    ),
                )
                seqs.append(int(cur.lastrowid or 0))
            for i, smp in samples.items():
                conn.execute(
                    INSERT_SAMPLE,
                    (seqs[i], float(smp.ts), smp.reason, smp.label, float(smp.score), smp.width, smp.height, smp.jpeg),
                )
            for smp in prior:
                conn.execute(
                    INSERT_SAMPLE,
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
        try:
            with self._write("make room on a full disk") as conn:
                evicted = evict_synced(conn, want_pages=want)
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
                INSERT_SAMPLE,
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
        return insert_event(self.db.conn, kind, detail)

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
        check_table(table)
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
        check_table(table)
        changed = 0
        with self._write(f"mark {table} synced") as conn:
            if isinstance(seqs_or_range, range) and seqs_or_range.step == 1:
                cur = conn.execute(
                    f"UPDATE {table} SET synced = 1 WHERE +synced = 0 AND seq >= ? AND seq < ?",
                    (seqs_or_range.start, seqs_or_range.stop),
                )
                return cur.rowcount
            seqs = sorted({int(s) for s in seqs_or_range})
            for i in range(0, len(seqs), MAX_SEQS_PER_STATEMENT):
                chunk = seqs[i : i + MAX_SEQS_PER_STATEMENT]
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
        check_table(table)
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
