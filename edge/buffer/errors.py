"""SQLite errors the buffer meets, classified, and turned into BufferStoreError with a hint."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.exceptions import BufferStoreError

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_READONLY = 8
_SQLITE_FULL = 13


# Python 3.10's sqlite3 errors carry no result code, only SQLite's message for it.
_CODE_OF_MESSAGE = {
    "database or disk is full": _SQLITE_FULL,
    "database is locked": _SQLITE_BUSY,
    "attempt to write a readonly database": _SQLITE_READONLY,
    "database disk image is malformed": _SQLITE_CORRUPT,
    "file is not a database": _SQLITE_NOTADB,
}


def error_code(exc: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``exc`` (on Python 3.10, read from its message)."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return _CODE_OF_MESSAGE.get(str(exc)) if code is None else int(code) & 0xFF


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged or not a database at all."""
    code = error_code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def is_full(exc: BufferStoreError) -> bool:
    """Whether a store error came from SQLITE_FULL (the disk, or the file's page limit)."""
    cause = exc.__cause__
    return isinstance(cause, sqlite3.Error) and error_code(cause) == _SQLITE_FULL


def store_error(path: Path, busy_timeout_s: float, what: str, exc: sqlite3.Error) -> BufferStoreError:
    """``could not <what> in buffer <path>: <SQLite's message> (<what to do>)``."""
    code = error_code(exc)
    where = f"could not {what} in buffer {path}"
    if code == _SQLITE_BUSY:
        hint = (
            f"it stayed locked for {busy_timeout_s:g} s; is a second agent using the same buffer.path?"
        )
    elif code == _SQLITE_FULL:
        hint = "the disk is full; free space on the device or lower buffer.max_bytes"
    elif code == _SQLITE_READONLY:
        hint = "the file is read-only; check the agent user can write it and its folder"
    elif is_corruption(exc):
        hint = "the file is damaged; restart the agent so it sets the file aside and starts a fresh buffer"
    elif isinstance(exc, sqlite3.ProgrammingError):
        hint = "a Buffer belongs to the thread that opened it; open one Buffer per thread"
    else:
        hint = "see the SQLite message"
    return BufferStoreError(f"{where}: {exc} ({hint})")
