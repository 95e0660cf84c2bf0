"""A resumable download of a packed bundle: the file at its offsets, one byte per chunk on disk.

:class:`Download` is the device's half of a transfer's state: what arrived, what was asked
for, and where the bytes are. It survives a killed process (the bitmap is written after
each chunk's data) so :class:`edge.ota.OtaClient` resumes by asking only for what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from edge.fsutil import atomic_write
from edge.install import rmtree
from edge.ota_wire import OtaDesired

DOWNLOADS = "downloads"


class Download:
    """``downloads/<transfer>/``: ``meta.json`` (the desired message), ``bundle.part``
    (chunks written at their offsets) and ``bitmap``, one byte per chunk: 0 missing,
    1 written, 2 requested and not yet received (so a restarted device can wait for chunks
    its persistent MQTT session still holds instead of asking for them again).

    The bitmap byte is written after its chunk's data, so after a killed process every
    chunk marked received is in the file; fsync happens every second and at the end
    (after a power loss the whole-file sha256 catches what the page cache lost, and the
    transfer starts again).
    """

    def __init__(self, root: Path, desired: OtaDesired) -> None:
        assert desired.size is not None and desired.chunks is not None
        self.desired = desired
        self.dir = Path(root) / desired.transfer
        self.part = self.dir / "bundle.part"
        self.bitmap_path = self.dir / "bitmap"
        self.meta_path = self.dir / "meta.json"
        self.size = desired.size
        self.chunks = desired.chunks
        self.chunk_bytes = desired.chunk_bytes
        self.resumed = self._open_existing()
        if not self.resumed:
            self._create()
        self.received = sum(1 for b in self.bitmap if b == 1)
        self._last_sync = time.monotonic()

    def _open_existing(self) -> bool:
        try:
            meta = json.loads(self.meta_path.read_text())
            same = all(meta.get(k) == getattr(self.desired, k) for k in ("transfer", "sha256", "size", "chunk_bytes"))
            if not same or self.part.stat().st_size != self.size or self.bitmap_path.stat().st_size != self.chunks:
                return False
            self.bitmap = bytearray(self.bitmap_path.read_bytes())
        except (OSError, ValueError):
            return False
        if any(b not in (0, 1, 2) for b in self.bitmap):
            return False
        self._fd = os.open(self.part, os.O_RDWR)
        self._bfd = os.open(self.bitmap_path, os.O_RDWR)
        return True

    def _create(self) -> None:
        rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        self.bitmap = bytearray(self.chunks)
        self._bfd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._bfd, bytes(self.bitmap))
        os.fsync(self._fd)
        os.fsync(self._bfd)
        # meta.json last: a folder without it is not a resumable download
        atomic_write(self.meta_path, self.desired.model_dump_json())

    def expected_len(self, index: int) -> int:
        return min(self.chunk_bytes, self.size - index * self.chunk_bytes)

    def missing(self) -> list[int]:
        """Chunks neither received nor requested."""
        return [i for i, b in enumerate(self.bitmap) if b == 0]

    def requested(self) -> list[int]:
        """Chunks requested (maybe before a restart) and not received yet."""
        return [i for i, b in enumerate(self.bitmap) if b == 2]

    def mark_requested(self, indexes: list[int]) -> None:
        for i in indexes:
            if self.bitmap[i] == 0:
                self.bitmap[i] = 2
                os.pwrite(self._bfd, b"\x02", i)

    @property
    def complete(self) -> bool:
        return self.received == self.chunks

    def has(self, index: int) -> bool:
        return self.bitmap[index] == 1

    def write(self, index: int, data: bytes) -> None:
        os.pwrite(self._fd, data, index * self.chunk_bytes)
        os.pwrite(self._bfd, b"\x01", index)
        self.bitmap[index] = 1
        self.received += 1
        if time.monotonic() - self._last_sync > 1.0:
            self.sync()

    def sync(self) -> None:
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.fsync(self._bfd)
        self._last_sync = time.monotonic()

    def reset(self) -> None:
        """Forget every chunk (the whole file failed its sha256)."""
        self.bitmap = bytearray(self.chunks)
        os.pwrite(self._bfd, bytes(self.bitmap), 0)
        self.received = 0
        self.sync()

    def close(self) -> None:
        for fd in (self._fd, self._bfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._bfd = -1

    def remove(self) -> None:
        self.close()
        rmtree(self.dir)


__all__ = ["DOWNLOADS", "Download"]
