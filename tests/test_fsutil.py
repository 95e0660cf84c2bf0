"""edge.fsutil: whole-file replacement, its permissions and clean-up, file checksums."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest

from edge.fsutil import atomic_write, fsync_dir, fsync_tree, sha256_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_bytes_and_text(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")
    atomic_write(path, "grüße")  # text is UTF-8
    assert path.read_bytes() == "grüße".encode()
    atomic_write(path, b"fast", durable=False)
    assert path.read_bytes() == b"fast"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"], (
        "no temp file is left behind"
    )


def test_atomic_write_creates_with_mode_and_respects_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "key.pem", b"secret", mode=0o600)
        atomic_write(tmp_path / "open.txt", b"x", mode=0o666)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "key.pem") == 0o600
    assert _mode(tmp_path / "open.txt") == 0o644


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # os.replace cannot put a file over a folder
    (target / "inside").write_text("kept")
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert (target / "inside").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_stale_temp_file_from_a_crash_does_not_block_or_leak_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    stale = tmp_path / f".key.pem.{os.getpid()}-{threading.get_ident()}.tmp"
    stale.write_bytes(b"half")
    stale.chmod(0o666)
    atomic_write(path, b"whole", mode=0o600)
    assert path.read_bytes() == b"whole" and _mode(path) == 0o600 and not stale.exists()


def test_sha256_file_and_fsyncs(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # more than one read block
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "sub" / "blob") == hashlib.sha256(data).hexdigest()
    fsync_dir(tmp_path)
    fsync_tree(tmp_path)
