"""The byte budget: used bytes, eviction by value, and room for new rows on a full disk.

Every function here runs inside the caller's write transaction. The order and the gap
records are described in docs/buffer.md, "Byte budget" and "Full disk".
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from edge.buffer.schema import BUMP_COUNTER, MAX_SEQS_PER_STATEMENT, insert_event

logger = logging.getLogger(__name__)

# An eviction pass frees this fraction of the budget, at most MAX_EVICT_BYTES.
LOW_WATER_FRACTION = 0.10
MAX_EVICT_BYTES = 2 * 1024 * 1024

# Eviction steps in order: (table, [WHERE clauses merged oldest first], unsynced?).
# Each clause walks an index in seq order; synced results come from two index
# ranges (pass and fail) merged by seq so "oldest first" holds across both.
EVICTION_STEPS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("samples", ("synced = 1",), False),
    ("results", ("synced = 1 AND passed = 1", "synced = 1 AND passed = 0"), False),
    ("events", ("synced = 1",), False),
    ("gaps", ("synced = 1",), False),
    ("samples", ("synced = 0",), True),
    ("results", ("synced = 0 AND passed = 1",), True),
    ("events", ("synced = 0",), True),
    ("results", ("synced = 0 AND passed = 0",), True),
)
# Counters of rows the cloud already had (evicting them lost nothing).
_SYNCED_COUNTERS = ("evicted_synced", "evicted_samples", "evicted_events", "evicted_gaps")


def used_bytes(conn: sqlite3.Connection, page_size: int) -> int:
    """Live bytes of the main file: ``(page_count - freelist_count) * page_size``."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    return int(pages - _free_pages(conn)) * page_size


def _free_pages(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def enforce_budget(conn: sqlite3.Connection, *, max_bytes: int, page_size: int, path: Path) -> None:
    """When used bytes exceed ``max_bytes``, evict by value down to the low-water mark.

    Writes the gap rows, bumps the counters, records an ``eviction`` event and returns
    the freed pages to the file system (incremental vacuum).
    """
    used = used_bytes(conn, page_size)
    if used <= max_bytes:
        return
    before = used
    target = max_bytes - min(int(max_bytes * LOW_WATER_FRACTION), MAX_EVICT_BYTES)
    counts: dict[str, int] = {}
    # table -> [first_seq, last_seq, count, passed_count, failed_count] for gap rows
    gaps: dict[str, list[int]] = {}
    for table, wheres, unsynced in EVICTION_STEPS:
        batch = 32
        while used > target:
            picked = _pick(conn, table, wheres, batch)
            if not picked:
                break
            _delete(conn, table, picked)
            account(table, unsynced, picked, counts, gaps)
            used = used_bytes(conn, page_size)
            batch = min(batch * 2, MAX_SEQS_PER_STATEMENT)
        if used <= target:
            break
    now = time.time()
    for table_name, (first, last, count, passed, failed) in gaps.items():
        conn.execute(
            "INSERT INTO gaps (ts, table_name, first_seq, last_seq, count, passed_count, failed_count)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, table_name, first, last, count, passed, failed),
        )
    _record_pass(conn, counts, {"bytes_before": before, "bytes_after": used, "max_bytes": max_bytes, "evicted": counts})
    # Python's sqlite3 steps a row-less PRAGMA once, and each step of
    # incremental_vacuum returns one page: loop over the free list.
    for _ in range(_free_pages(conn)):
        conn.execute("PRAGMA incremental_vacuum").close()
    after = used_bytes(conn, page_size)
    if after > max_bytes:
        logger.warning(
            "buffer %s still holds %s bytes over its %s byte budget after evicting everything it may;"
            " raise buffer.max_bytes",
            path,
            after,
            max_bytes,
        )
    logger.info("buffer eviction: %s -> %s bytes, %s", before, after, counts)


def evict_synced(conn: sqlite3.Connection, *, want_pages: int) -> int:
    """Evict rows the cloud already stored, in the budget's order, until ``want_pages`` are free.

    Never an unsynced row. Counted, and recorded as an ``eviction`` event with
    ``reason: disk_full``. Returns the rows evicted.
    """
    counts: dict[str, int] = {}
    start_free = _free_pages(conn)
    for table, wheres, unsynced in EVICTION_STEPS:
        if unsynced:
            break  # only what the cloud already stored
        while _free_pages(conn) - start_free < want_pages:
            picked = _pick(conn, table, wheres, MAX_SEQS_PER_STATEMENT)
            if not picked:
                break
            _delete(conn, table, picked)
            account(table, False, picked, counts, {})
    evicted = sum(v for k, v in counts.items() if k in _SYNCED_COUNTERS)
    if evicted:
        _record_pass(conn, counts, {"reason": "disk_full", "evicted": counts})
    return evicted


def _pick(conn: sqlite3.Connection, table: str, wheres: tuple[str, ...], limit: int) -> list[tuple[int, int]]:
    """Up to ``limit`` oldest (seq, flag) rows matching any of ``wheres``.

    flag: results: passed; samples: reason == 'fail'; other tables: 0.
    """
    cols = "seq, passed" if table == "results" else "seq, reason = 'fail'" if table == "samples" else "seq, 0"
    picked: list[tuple[int, int]] = []
    for where in wheres:
        picked += conn.execute(f"SELECT {cols} FROM {table} WHERE {where} ORDER BY seq LIMIT ?", (limit,)).fetchall()
    return sorted(picked)[:limit]


def _delete(conn: sqlite3.Connection, table: str, picked: list[tuple[int, int]]) -> None:
    seqs = [seq for seq, _ in picked]
    conn.execute(f"DELETE FROM {table} WHERE seq IN ({','.join('?' * len(seqs))})", seqs)


def _record_pass(conn: sqlite3.Connection, counts: dict[str, int], detail: dict[str, object]) -> None:
    """One eviction pass: its counters bumped and its ``eviction`` event (``detail``)."""
    counts["eviction_passes"] = 1
    for name, value in counts.items():
        conn.execute(BUMP_COUNTER, (name, value))
    insert_event(conn, "eviction", detail)


def account(
    table: str,
    unsynced: bool,
    picked: list[tuple[int, int]],
    counts: dict[str, int],
    gaps: dict[str, list[int]],
) -> None:
    """Add evicted rows to the pass's ``counts`` and, for unsynced results and samples, ``gaps``."""

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
