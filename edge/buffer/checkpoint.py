"""Background WAL checkpoints: the copy of the WAL into the main file, off the writer's commits.

See docs/buffer.md, "Checkpoints off the commit path".
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

# ``auto``: SQLite checkpoints inside the commit that fills the WAL; ``background``: a Checkpointer.
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


class Checkpointer:
    """PASSIVE WAL checkpoints from a thread and connection of their own.

    Moves the copy of the WAL into the main file, and its two fsyncs, off the commits
    of the writer (docs/buffer.md). ``PASSIVE`` takes no writer lock and
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

