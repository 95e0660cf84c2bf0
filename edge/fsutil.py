"""Files replaced whole, names made durable, and file checksums: the one way to do each.

:func:`atomic_write` is how every file the edge, the cloud and the trainer keep is written:
a reader (or the next start after a power cut) finds the old content or the new, never a
part of it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

_BLOCK_BYTES = 1 << 20


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (``str`` is written as UTF-8); its folder must exist.

    The data goes to a temp file beside ``path``, created with ``mode`` (less the umask, so
    a key is never readable by others, even for a moment), which is fsynced, renamed over
    ``path``, and then the folder is fsynced so the rename survives a power loss too.
    ``durable=False`` skips both fsyncs: for files rewritten every few seconds (live status)
    or easily made again (exports), so they never queue behind the buffer's commits; they
    are still never seen half-written.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    # Per process and thread: two writers of one file never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash; O_EXCL below then creates it with `mode`
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created or renamed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder bottom-up, so a rename publishes complete data."""
    dirs: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(Path(dirpath))
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(d)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_write", "fsync_dir", "fsync_tree", "sha256_file"]
