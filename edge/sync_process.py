"""The sync client in a process of its own, beside the inspecting agent.

Why a process and not a thread: draining a backlog is Python work (reading rows, encoding
batches, marking acks) and in the agent's process it holds the GIL the inspection thread
needs between frames, so every drain slice showed up in the line's decision latency. In a
child process the drain only shares the CPU, which the OS schedules across cores, and a
crash in it cannot touch inspection. The buffer is SQLite in WAL mode, so the two
processes share it as they shared it as threads (the sync side has its own connection).

The child gets the validated config as JSON on stdin (secrets stay in the inherited
environment), reads the agent's live state from the status file the agent rewrites every
second, and ends:

- on SIGTERM (the agent stopping): it flushes its acks, publishes a retained ``offline``
  status and disconnects, like the thread did;
- when the agent process is gone (``kill -9``, a crash): at once, without a goodbye, so the
  broker publishes the last will (``offline``, reason ``lost``) as for a dead box.

The agent's watchdog restarts a child that died on its own, with a growing delay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from edge.config import AgentConfig

logger = logging.getLogger(__name__)

SYNC_NICE = 10  # the line's threads win the CPU whenever both want it; an idle box drains at full speed
PARENT_POLL_S = 0.5  # how quickly the child notices its agent is gone
RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0


class SyncProcess:
    """Start, watch and stop the ``python -m edge.sync_process`` child of an agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._restart_delay = RESTART_MIN_S
        self._restart_at = 0.0
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Spawn the child (returns at once; the network is never waited for)."""
        level = logging.getLogger().getEffectiveLevel()
        # The child re-imports edge from the same place the agent did, even from a checkout.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.sync_process", str(os.getpid()), str(level)],
            stdin=subprocess.PIPE,
            # Never the agent's stdout: that is the --echo stream, and a reader waiting for its
            # end must not wait for this child too. Logs go to the shared stderr.
            stdout=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(self.config.model_dump_json().encode())
            proc.stdin.close()
        except OSError as exc:  # it died at start; the watchdog restarts it
            logger.warning("sync process did not take its config: %s", exc)
        self.proc = proc
        logger.info("sync process %s started", proc.pid)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Restart the child if it died on its own (called by the agent's watchdog)."""
        with self._lock:
            if self._stopping or self.proc is None or self.proc.poll() is None:
                return
            now = time.monotonic()
            if self._restart_at == 0.0:
                logger.warning(
                    "sync process %s exited with %s; restarting it in %.0f s",
                    self.proc.pid, self.proc.returncode, self._restart_delay,
                )  # fmt: skip
                self._restart_at = now + self._restart_delay
                return
            if now < self._restart_at:
                return
            self._restart_at = 0.0
            self._restart_delay = min(RESTART_MAX_S, self._restart_delay * 2)
            self.restarts += 1
            self.start()

    def stop(self) -> None:
        """Ask the child to finish (SIGTERM): it says goodbye to the broker and exits."""
        with self._lock:
            self._stopping = True
            if self.is_alive():
                assert self.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the child; one that does not end in ``timeout`` is killed."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("sync process %s did not stop in time; killed", self.proc.pid)
            self.proc.kill()
            self.proc.wait()

    def snapshot(self) -> dict[str, Any]:
        return {"pid": None if self.proc is None else self.proc.pid, "alive": self.is_alive(), "restarts": self.restarts}


def _child_main(parent_pid: int, level: int) -> int:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = AgentConfig.model_validate_json(sys.stdin.buffer.read())
    with contextlib.suppress(OSError):
        os.nice(SYNC_NICE)

    from edge.status import read_live
    from edge.sync import SyncClient

    def agent_status() -> dict[str, Any]:
        live = read_live(config)
        live.pop("state", None)  # the agent's own stopped/running; the sync says online/offline
        live["sync_pid"] = os.getpid()
        return live

    client = SyncClient(config, status=agent_status)
    signal.signal(signal.SIGTERM, lambda _s, _f: client.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the agent decides
    client.start()
    shown: dict[str, Any] | None = None
    while not client.stop_event.wait(PARENT_POLL_S):
        shown = _publish_link_state(config, client, shown)
        if os.getppid() != parent_pid:
            # The agent died without stopping us: vanish, and let the broker send the will.
            logger.warning("agent %s is gone; sync process exits", parent_pid)
            os._exit(0)
        if not client.is_alive():
            return 1
    client.join(5.0)
    return 0


LINK_STATE_KEYS = ("connected", "connected_since", "connects", "last_error", "bad_acks", "ignored_acks", "ignored_ack_rows")


def _publish_link_state(config: AgentConfig, client: Any, shown: dict[str, Any] | None) -> dict[str, Any]:
    """Write the link state for `linewatch edge status` when it changed (a wrong CA is only
    seen here: the link cannot tell the cloud). Returns what the file now holds."""
    import json

    from edge.fsutil import atomic_write
    from edge.status import sync_status_path

    snap = client.snapshot()
    state = {k: snap.get(k) for k in LINK_STATE_KEYS}
    if state == shown:
        return state
    path = sync_status_path(config)
    try:
        atomic_write(path, json.dumps(state), durable=False)  # live state: no fsync beside the buffer's
    except OSError as exc:  # a full disk must not stop the sync
        logger.debug("sync state file %s not written: %s", path, exc)
        return shown or {}
    return state


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2])))
