"""`linewatch edge status`: what the agent decided and how it is doing.

Counts come from the SQLite buffer (the durable truth, readable while the agent runs);
live state (camera, runtime, pid) comes from the status file the agent rewrites every
second. A status file whose process is gone is reported as ``stopped``/``crashed``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edge.buffer import Buffer
from edge.config import AgentConfig
from edge.exceptions import BufferStoreError, LinewatchError


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def sync_status_path(config: AgentConfig) -> Path:
    """Where the sync process keeps its link state (connected, last error, acks ignored)."""
    return config.status_path.with_name(config.status_path.stem + ".sync.json")


def read_sync(config: AgentConfig) -> dict[str, Any] | None:
    """The sync process's last link state, or None if it never wrote one."""
    try:
        return dict(json.loads(sync_status_path(config).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_live(config: AgentConfig) -> dict[str, Any]:
    """The agent's last status file, or {} if it never ran here."""
    try:
        return dict(json.loads(config.status_path.read_text()))
    except (OSError, ValueError):
        return {}


def read_status(config: AgentConfig) -> dict[str, Any]:
    """One status object with at least the keys docs/design.md names."""
    live = read_live(config)
    try:
        with Buffer.open_readonly(config.buffer.path) as buf:
            stats = buf.stats()
    except BufferStoreError:
        stats = {}
    state = live.get("state", "never_run")
    if state == "running" and not _alive(live.get("pid")):
        state = "crashed"
    model_version = live.get("model_version")
    runtime = live.get("runtime")
    if model_version is None:
        try:
            from edge.models import ModelStore
            from edge.protocol import read_manifest

            model_version = read_manifest(ModelStore(config.model.path).current()).version
        except LinewatchError:
            model_version = None
    results = int(stats.get("results", 0) or 0)
    passed = int(stats.get("passed", 0) or 0)
    failed = int(stats.get("failed", 0) or 0)
    from edge.capture import redact_url  # a camera URL's password never reaches the output

    camera = live.get("camera") or {"state": "unknown", "source": redact_url(str(config.camera.source))}
    return {
        "device_id": config.device_id,
        "agent": state,
        "pid": live.get("pid"),
        "updated_s_ago": None if "updated" not in live else round(time.time() - float(live["updated"]), 1),
        "results": results,
        "passed": passed,
        "failed": failed,
        "pass_rate": None if results == 0 else round(passed / results, 4),
        "unsynced": int(stats.get("unsynced", 0) or 0),
        "samples": stats.get("samples"),
        "last_decision": stats.get("last_result"),
        "model_version": model_version,
        "runtime": runtime,
        "camera": camera,
        "dropped_frames": camera.get("dropped", 0),
        "buffer_bytes": stats.get("bytes_used"),
        "buffer_max_bytes": config.buffer.max_bytes,
        # set while the agent cannot write its buffer (disk full, permissions): decisions wait
        "buffer_error": live.get("buffer_error") if state == "running" else None,
        "buffer_error_since": live.get("buffer_error_since") if state == "running" else None,
        "decisions_waiting": live.get("decisions_waiting") if state == "running" else None,
        "evictions": stats.get("evictions", {}),
        "session": live.get("session"),
        # the MQTT drain's child process: {pid, alive, restarts}; None with mqtt.enabled = false
        "sync_process": live.get("sync_process") if state == "running" else None,
        # {state: ok|warning|drift, checks: off|baseline|on, reasons, measures, ...} (docs/agent.md, "Drift");
        # the last one the agent wrote, also after it stopped
        "drift": live.get("drift"),
        # why sync and OTA cannot reach the broker (TLS files), and the OTA state; the line inspects anyway
        "mqtt_error": live.get("mqtt_error") if state == "running" else None,
        "ota": live.get("ota") if state == "running" else None,
        # the MQTT link as the sync process sees it: connected, last_error (a wrong CA shows here), acks ignored
        "sync": read_sync(config) if state == "running" else None,
    }
