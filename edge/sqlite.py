"""SQLite plumbing shared by the edge buffer and the cloud store: write transactions, migrations.

Both stores open their connections in autocommit mode (``isolation_level=None``) and
issue their own transactions through :func:`write_transaction`. Schema changes are
:class:`Migration` objects applied by :func:`run_migrations`, which records each one in a
``_migrations`` table (the *ledger*). The two stores' ledgers have different columns,
because files in the field already have them: :class:`VersionedLedger` (the edge
buffer: consecutive versions, the highest is the schema version) and
:class:`NamedLedger` (the cloud store: names, so the store's and the registry's
migrations share one table). See docs/buffer.md and docs/sync.md.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from sqlite_utils import Database

logger = logging.getLogger(__name__)

LEDGER_TABLE = "_migrations"


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` on any exception, which propagates.

    IMMEDIATE takes the write lock up front: a deferred transaction that reads first and
    writes later fails at once with SQLITE_BUSY if another connection wrote in between;
    IMMEDIATE waits for the connection's busy timeout instead.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@dataclass(frozen=True)
class Migration:
    """One schema change: ``apply(db)`` runs inside the transaction that records it.

    ``version`` is its place in a :class:`VersionedLedger` (1, 2, 3, ...); a
    :class:`NamedLedger` records ``name`` alone.
    """

    name: str
    apply: Callable[[Database], None]
    version: int | None = None


class MigrationLedger(Protocol):
    """Where a database records the migrations applied to it."""

    def create(self, db: Database) -> None:
        """Create the ledger table if it is missing."""
        ...

    def applied(self, db: Database, migration: Migration) -> bool:
        """Whether ``migration`` is recorded."""
        ...

    def record(self, db: Database, migration: Migration) -> None:
        """Record ``migration`` as applied now."""
        ...


class VersionedLedger:
    """``_migrations(version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)``: the edge buffer's.

    Versions are applied in order, so a migration is applied when its version is at or
    below the highest recorded one (:meth:`version`, the schema version).
    """

    def create(self, db: Database) -> None:
        db.table(LEDGER_TABLE).create(
            {"version": int, "name": str, "applied_at": str}, pk="version", if_not_exists=True
        )

    def version(self, db: Database) -> int:
        """The highest recorded version, 0 for a database without a ledger."""
        if not db.table(LEDGER_TABLE).exists():
            return 0
        row = db.execute(f"SELECT max(version) FROM {LEDGER_TABLE}").fetchone()
        return int(row[0] or 0)

    def applied(self, db: Database, migration: Migration) -> bool:
        return _version_of(migration) <= self.version(db)

    def record(self, db: Database, migration: Migration) -> None:
        db.table(LEDGER_TABLE).insert(
            {
                "version": _version_of(migration),
                "name": migration.name,
                "applied_at": datetime.now(timezone.utc).isoformat(),
            }
        )


class NamedLedger:
    """``_migrations(name TEXT PRIMARY KEY, applied REAL)``: the cloud store's.

    Several sets of migrations (the store's, the registry's ``ota_*``) share one table,
    each applied by name.
    """

    def create(self, db: Database) -> None:
        db.execute(f"CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (name TEXT PRIMARY KEY, applied REAL)")

    def applied(self, db: Database, migration: Migration) -> bool:
        return db.execute(f"SELECT 1 FROM {LEDGER_TABLE} WHERE name = ?", (migration.name,)).fetchone() is not None

    def record(self, db: Database, migration: Migration) -> None:
        db.execute(f"INSERT INTO {LEDGER_TABLE} (name, applied) VALUES (?, ?)", (migration.name, time.time()))


def _version_of(migration: Migration) -> int:
    if migration.version is None:
        raise ValueError(f"migration {migration.name!r} has no version; a versioned ledger needs one")
    return migration.version


def run_migrations(db: Database, migrations: Sequence[Migration], ledger: MigrationLedger, *, what: str) -> list[Migration]:
    """Apply, in order, each of ``migrations`` that ``ledger`` does not record yet.

    Each runs in its own write transaction together with its ledger row, so a crash leaves
    the schema at a whole migration. The ledger is read again inside the write lock, so
    two processes opening one file apply each migration once. ``what`` names the database
    in the log. Returns the migrations applied.
    """
    with write_transaction(db.conn):
        ledger.create(db)
    applied: list[Migration] = []
    for migration in migrations:
        with write_transaction(db.conn):
            if ledger.applied(db, migration):
                continue
            migration.apply(db)
            ledger.record(db, migration)
        logger.info("%s: applied migration %s", what, migration.name)
        applied.append(migration)
    return applied


__all__ = [
    "LEDGER_TABLE",
    "Migration",
    "MigrationLedger",
    "NamedLedger",
    "VersionedLedger",
    "run_migrations",
    "write_transaction",
]
