"""A damaged buffer file: found by an integrity check, set aside, and the fresh file's seq floors.

See docs/buffer.md, "Corruption" and "Seq numbers".
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from edge.buffer.schema import BUMP_COUNTER, TABLES, insert_event
from edge.exceptions import BufferStoreError

logger = logging.getLogger(__name__)

# ``auto``: integrity_check up to QUICK_CHECK_ABOVE_BYTES, quick_check above; ``off``: none.
IntegrityMode = Literal["auto", "full", "quick", "off"]
# integrity_check above this size takes seconds on an SD card; quick_check instead.
QUICK_CHECK_ABOVE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Recovery:
    """A damaged buffer file was set aside and a fresh one started."""

    reason: str
    kept_aside: Path
    at: float  # unix time
    seq_floors: dict[str, int]  # table -> seq the fresh file continues above


def check_integrity(conn: sqlite3.Connection, path: Path, size: int, mode: IntegrityMode) -> str | None:
    """None when the file is sound, else why not. Raises sqlite3 errors (not a db, locked)."""
    if mode == "off":
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return None
    pragma = "quick_check" if mode == "quick" or (mode == "auto" and size > QUICK_CHECK_ABOVE_BYTES) else "integrity_check"
    started = time.monotonic()
    problems = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
    logger.debug("%s of %s (%s bytes) took %.3f s", pragma, path, size, time.monotonic() - started)
    if problems == ["ok"]:
        return None
    return f"{pragma} failed: " + "; ".join(problems[:5])


def set_aside(path: Path, reason: str) -> Recovery:
    """Move the damaged file and its -wal/-shm to ``<name>.corrupt-<UTC timestamp>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while kept.exists():
        kept = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
        n += 1
    try:
        os.replace(path, kept)
        # Same suffixes as SQLite's, so the kept file opens with its own WAL.
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, Path(f"{kept}{suffix}"))
    except OSError as exc:
        raise BufferStoreError(
            f"buffer {path} is damaged ({reason}) and could not be moved aside ({exc});"
            " move or delete it by hand, then restart the agent"
        ) from exc
    floors = salvage_seq_floors(kept)
    logger.warning("buffer %s is damaged (%s); kept it as %s and started a fresh buffer", path, reason, kept)
    return Recovery(reason=reason, kept_aside=kept, at=time.time(), seq_floors=floors)


def salvage_seq_floors(kept: Path) -> dict[str, int]:
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


def record_recovery(conn: sqlite3.Connection, rec: Recovery) -> None:
    """In the fresh file (inside the caller's transaction): seq floors, the counter, the event."""
    for table, floor in rec.seq_floors.items():
        if conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (floor, table)).rowcount == 0:
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, floor))
    conn.execute(BUMP_COUNTER, ("recoveries", 1))
    insert_event(
        conn,
        "buffer_recovered",
        {"reason": rec.reason, "kept_aside": str(rec.kept_aside), "seq_floors": rec.seq_floors},
    )
