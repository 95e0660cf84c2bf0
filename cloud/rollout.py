"""Rollouts: tell devices which model to run, canaries first; halt and roll back on failures.

The chunks themselves are served by :class:`cloud.ota_server.OtaServer`; the device states
it receives are stored by :func:`record_state` here, next to the rollout tables they update.

:func:`run_push` is one rollout::

    resolve TARGET (a device id, a group the devices announce in their status, or a
    comma-separated list of both) -> canaries = the first N (or N%) devices, sorted
    canary phase: desired -> canaries; wait until successes reach --min-success (proceed)
                  or failures make that impossible / --timeout passes (halt)
    main phase:   desired -> the rest; wait; the rollout is ``done`` when the success ratio
                  over all devices (canaries included) reaches --min-success; as soon as
                  failures make that impossible, or at --timeout below it: halt
    halt:         every device that may hold the new model (succeeded, or still pending)
                  is told to go back to the version it ran before; the rollout is
                  ``halted`` and its message says in which phase and what was rolled back

A device succeeds when it reports ``active`` on the new version (with ``--wait-health``:
and its health watch passed); it fails on ``failed``, ``rolled_back`` or the timeout.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloud.config import CloudConfig
from cloud.exceptions import CloudError
from cloud.ota_server import OtaServer, Transfer
from cloud.registry import RegisteredModel, Registry, open_ota_store, private_key_path
from cloud.store import SQLiteStore
from edge.ota_wire import (
    ACTIVE,
    FAILED,
    HEALTH_OK,
    ROLLED_BACK,
    OtaDesired,
    OtaStatePayload,
    sign_downgrade,
)
from edge.protocol import OTA_CHUNK_BYTES
from edge.signing import load_private_key
from edge.sqlite import write_transaction

logger = logging.getLogger(__name__)

SUCCESS = "success"
FAILURE = "failure"
PENDING = "pending"


def record_state(store: SQLiteStore, st: OtaStatePayload) -> None:
    """Store a device's OTA state (latest per device, and on its rollout's deployment row)."""
    now = time.time()
    with write_transaction(store.db.conn) as conn:
        old = conn.execute("SELECT ts FROM ota_device_state WHERE device_id = ?", (st.device_id,)).fetchone()
        if old is None or old["ts"] is None or st.ts >= old["ts"]:
            conn.execute(
                "INSERT OR REPLACE INTO ota_device_state (device_id, state, transfer, rollout, version, model_version,"
                " received, chunks, stage, reason, health, ts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (st.device_id, st.state, st.transfer, st.rollout, st.version, st.model_version, st.received, st.chunks,
                 st.stage, st.reason, st.health, st.ts, now),
            )  # fmt: skip
        if st.rollout:
            conn.execute(
                "UPDATE ota_deployments SET state = ?, received = ?, chunks = ?, stage = ?, reason = ?, health = ?,"
                " model_version = ?, updated = ? WHERE rollout = ? AND device_id = ? AND transfer = ?",
                (st.state, st.received, st.chunks, st.stage, st.reason, st.health, st.model_version, now,
                 st.rollout, st.device_id, st.transfer),
            )  # fmt: skip


# -- targets and rollouts -------------------------------------------------------------------------


def resolve_targets(store: SQLiteStore, target: str) -> list[str]:
    """Device ids named by ``target``: device ids and/or groups, comma-separated."""
    rows = store.db.conn.execute("SELECT device_id, groups FROM devices ORDER BY device_id").fetchall()
    known = {r["device_id"]: set(json.loads(r["groups"]) if r["groups"] else []) for r in rows}
    out: list[str] = []
    for name in [t.strip() for t in target.split(",") if t.strip()]:
        found = [name] if name in known else [d for d, groups in known.items() if name in groups]
        if not found:
            groups = sorted({g for gs in known.values() for g in gs})
            raise CloudError(
                f"no device or group named {name!r} (devices: {', '.join(sorted(known)[:10]) or 'none'}; "
                f"groups: {', '.join(groups[:10]) or 'none'}); devices announce their groups in their status messages"
            )
        out += [d for d in found if d not in out]
    return out


def parse_canary(spec: str | None, n: int) -> int:
    """``"2"`` -> 2 devices, ``"25%"`` -> ceil(25% of n) (at least 1); None -> 0."""
    if spec is None or spec == "":
        return 0
    try:
        if spec.endswith("%"):
            pct = float(spec[:-1])
            if not 0 < pct <= 100:
                raise ValueError
            return min(n, max(1, math.ceil(n * pct / 100)))
        count = int(spec)
        if count < 0:
            raise ValueError
        return min(n, count)
    except ValueError:
        raise CloudError(f"--canary {spec!r}: give a device count (2) or a percentage (25%)") from None


@dataclass(frozen=True)
class RolloutOutcome:
    """How a rollout ended."""

    rollout_id: str
    version: str
    state: str  # done | halted
    canaries: tuple[str, ...]
    devices: dict[str, str]  # device -> success | failure | pending (never reached)
    reasons: dict[str, str] = field(default_factory=dict)
    success_ratio: float = 0.0
    message: str = ""
    # devices told to go back to their previous version when the rollout halted, and how
    # that ended ("rolled back", "rollback failed: ...", ...)
    rolled_back: dict[str, str] = field(default_factory=dict)


def new_rollout_id() -> str:
    return f"r{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class _Rollout:
    def __init__(
        self,
        config: CloudConfig,
        store: SQLiteStore,
        server: OtaServer,
        model: RegisteredModel,
        devices: list[str],
        *,
        chunk_bytes: int,
        wait_health: bool,
        echo: Callable[[str], None],
        allow_downgrade: bool = False,
    ) -> None:
        self.config, self.store, self.server, self.model = config, store, server, model
        self.allow_downgrade = allow_downgrade
        self.devices = devices
        self.chunk_bytes = chunk_bytes
        self.wait_health = wait_health
        self.echo = echo
        self.id = new_rollout_id()
        self.transfer = f"{self.id}.{model.sha256[:8]}"
        self.previous: dict[str, str | None] = {}
        self.canaries: tuple[str, ...] = ()
        self._shown: dict[str, tuple[Any, ...]] = {}

    def _exec(self, sql: str, params: tuple[Any, ...]) -> None:
        with write_transaction(self.store.db.conn) as conn:
            conn.execute(sql, params)

    def offer(self, model: RegisteredModel, transfer: str) -> Transfer:
        t = Transfer(transfer, model.path, model.sha256, model.size, self.chunk_bytes)
        self._exec(
            "INSERT OR REPLACE INTO ota_transfers (transfer, sha256, chunk_bytes, size, chunks, created) VALUES (?, ?, ?, ?, ?, ?)",
            (transfer, model.sha256, self.chunk_bytes, model.size, t.chunks, time.time()),
        )
        self.server.offer(t)
        return t

    def desired(self, device: str, model: RegisteredModel, t: Transfer, *, downgrade: bool | None = None) -> OtaDesired:
        d = OtaDesired(
            v=1, device_id=device, version=model.version, transfer=t.transfer, rollout=self.id, sha256=model.sha256,
            size=model.size, chunks=t.chunks, chunk_bytes=t.chunk_bytes, ts=time.time(),
        )  # fmt: skip
        return self._intent(d) if (self.allow_downgrade if downgrade is None else downgrade) else d

    def _intent(self, desired: OtaDesired) -> OtaDesired:
        """Sign the downgrade intent (devices refuse an older version without it)."""
        path = private_key_path(self.config)
        if not path.is_file():
            return desired.model_copy(update={"allow_downgrade": True})  # unsigned: only boxes with allow_unsigned
        return sign_downgrade(desired, load_private_key(path))

    def begin(self, target: str, canaries: list[str], min_success: float, canary_spec: str | None) -> None:
        now = time.time()
        self.canaries = tuple(canaries)
        fleet = {r["device_id"]: r["model_version"] for r in self.store.db.conn.execute("SELECT device_id, model_version FROM devices")}
        self.previous = {d: fleet.get(d) for d in self.devices}
        self._exec(
            "INSERT INTO ota_rollouts (id, version, sha256, target, devices, canary, min_success, state, message, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.id, self.model.version, self.model.sha256, target, json.dumps(self.devices), canary_spec, min_success,
             "canary" if canaries else "running", None, now, now),
        )  # fmt: skip
        for d in self.devices:
            self._exec(
                "INSERT OR REPLACE INTO ota_deployments (rollout, device_id, phase, previous_version, transfer, desired_version,"
                " state, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.id, d, "canary" if d in canaries else "main", self.previous[d], self.transfer, self.model.version, PENDING, now),
            )
        self.offer(self.model, self.transfer)

    def set_state(self, state: str, message: str = "") -> None:
        self._exec("UPDATE ota_rollouts SET state = ?, message = ?, updated = ? WHERE id = ?", (state, message, time.time(), self.id))

    def verdict(self, device: str, transfer: str, version: str, *, health: bool = True) -> tuple[str, str | None]:
        """SUCCESS, FAILURE or PENDING for ``device`` on ``transfer``; ``health=False`` ignores --wait-health."""
        st = self.server.states.get(device)
        if st is None or st.transfer != transfer:
            return PENDING, None
        if st.state == ACTIVE and st.version == version and not st.reason:
            if health and self.wait_health and st.health != HEALTH_OK:
                return PENDING, None
            return SUCCESS, None
        if st.state in (FAILED, ROLLED_BACK) or (st.state == ACTIVE and st.reason):
            return FAILURE, f"{st.state}{f' at {st.stage}' if st.stage else ''}: {st.reason or ''}".strip()
        return PENDING, None

    def show(self, device: str) -> None:
        st = self.server.states.get(device)
        if st is None or st.rollout != self.id:
            return
        step = None
        if st.received is not None and st.chunks:
            step = (10 * st.received) // st.chunks
        key = (st.state, st.transfer, step, st.health, st.reason)
        if self._shown.get(device) == key:
            return
        self._shown[device] = key
        progress = f" {st.received}/{st.chunks} chunks" if st.received is not None and st.chunks else ""
        extra = f" health={st.health}" if st.health else ""
        why = f" ({st.stage}: {st.reason})" if st.reason else ""
        self.echo(f"  {device}: {st.state} {st.version or ''}{progress}{extra}{why}")

    def wait(
        self, devices: list[str], transfer: str, version: str, need: int, timeout_s: float
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Wait until every device ended, or failures leave fewer than ``need`` possible successes,
        or ``timeout_s``; returns device -> verdict and device -> reason."""
        deadline = time.monotonic() + timeout_s
        n = len(devices)
        while True:
            verdicts = {d: self.verdict(d, transfer, version) for d in devices}
            for d in devices:
                self.show(d)
            ok = sum(1 for v, _ in verdicts.values() if v == SUCCESS)
            bad = sum(1 for v, _ in verdicts.values() if v == FAILURE)
            pending = n - ok - bad
            if pending == 0 or (n - bad) < need:
                break
            if time.monotonic() >= deadline:
                break
            self.server.wait_change(min(0.5, max(0.01, deadline - time.monotonic())))
        timed_out = time.monotonic() >= deadline
        results = {d: v for d, (v, _) in verdicts.items()}
        reasons = {d: r for d, (_, r) in verdicts.items() if r}
        for d, v in results.items():
            if v == PENDING:
                reasons[d] = f"no final state within {timeout_s:.0f} s" if timed_out else "not finished when the phase was decided"
        return results, reasons

    def deploy(self, devices: list[str]) -> None:
        t = self.server._transfers[self.transfer]
        for d in devices:
            self.server.publish_desired(self.desired(d, self.model, t))

    def roll_back(self, devices: list[str], registry: Registry, timeout_s: float) -> dict[str, str]:
        """Tell ``devices`` to go back to their previous version; returns device -> outcome."""
        out: dict[str, str] = {}
        waiting: dict[str, tuple[str, str]] = {}
        for d in devices:
            prev = self.previous.get(d)
            if not prev or prev == self.model.version:
                out[d] = "no previous version known; left on the new model"
                continue
            transfer = f"{self.id}.rb"
            reg = registry.find(prev)
            if reg is not None and reg.path.is_file():
                transfer = f"{self.id}.rb-{reg.sha256[:8]}"
                t = self.offer(reg, transfer)
                desired = self.desired(d, reg, t, downgrade=True)  # going back is a downgrade on purpose
            else:
                # Not in the registry: the device still keeps it as its previous model.
                desired = self._intent(OtaDesired(v=1, device_id=d, version=prev, transfer=transfer, rollout=self.id, ts=time.time()))
            self._exec(
                "UPDATE ota_deployments SET transfer = ?, desired_version = ? WHERE rollout = ? AND device_id = ?",
                (transfer, prev, self.id, d),
            )
            self.server.publish_desired(desired)
            waiting[d] = (transfer, prev)
            self.echo(f"  {d}: rolling back to {prev}")
        deadline = time.monotonic() + timeout_s
        while waiting and time.monotonic() < deadline:
            for d, (transfer, prev) in list(waiting.items()):
                v, reason = self.verdict(d, transfer, prev, health=False)
                if v != PENDING:
                    out[d] = "rolled back" if v == SUCCESS else f"rollback failed: {reason}"
                    del waiting[d]
            if waiting:
                self.server.wait_change(0.5)
        for d in waiting:
            out[d] = f"rollback not confirmed within {timeout_s:.0f} s"
        return out


def _canary_phase(
    ro: _Rollout,
    config: CloudConfig,
    store: SQLiteStore,
    devices: list[str],
    canaries: list[str],
    min_success: float,
    timeout_s: float,
    results: dict[str, str],
    reasons: dict[str, str],
    echo: Callable[[str], None],
) -> RolloutOutcome | None:
    """Deploy to the canaries and wait; the halted outcome when too few succeed, else None (go on)."""
    echo(f"canary phase: {', '.join(canaries)} (need {min_success:.0%} success)")
    ro.deploy(canaries)
    res, why = ro.wait(canaries, ro.transfer, ro.model.version, math.ceil(min_success * len(canaries) - 1e-9), timeout_s)
    results.update(res)
    reasons.update(why)
    ok = sum(1 for v in res.values() if v == SUCCESS)
    if ok / len(canaries) < min_success:
        echo(f"canaries: {ok}/{len(canaries)} succeeded, below {min_success:.0%}: halting, rolling canaries back")
        for d in devices:
            results.setdefault(d, PENDING)
        return _halt(ro, config, store, canaries, results, reasons, timeout_s,
                     f"halted after canaries: {ok}/{len(canaries)} succeeded")  # fmt: skip
    echo(f"canaries: {ok}/{len(canaries)} succeeded; proceeding")
    ro.set_state("running")
    return None


def run_push(
    config: CloudConfig,
    model: RegisteredModel,
    target: str,
    *,
    canary: str | None = None,
    min_success: float = 1.0,
    timeout_s: float = 600.0,
    chunk_bytes: int = OTA_CHUNK_BYTES,
    wait_health: bool = False,
    server: OtaServer | None = None,
    echo: Callable[[str], None] = print,
    allow_downgrade: bool = False,
) -> RolloutOutcome:
    """One rollout of ``model`` to ``target`` (see the module docstring); returns how it ended.

    Serves chunks from this process with its own :class:`OtaServer` unless one is given.
    """
    if not 0 < min_success <= 1:
        raise CloudError(f"--min-success {min_success}: give a ratio in (0, 1], e.g. 0.9")
    if not 1024 <= chunk_bytes <= OTA_CHUNK_BYTES:
        raise CloudError(f"chunk size {chunk_bytes} must be within 1024..{OTA_CHUNK_BYTES}")
    store = open_ota_store(config)
    own_server = server is None
    try:
        devices = resolve_targets(store, target)
        n_canary = parse_canary(canary, len(devices))
        canaries = devices[:n_canary] if n_canary < len(devices) else []
        srv = server or OtaServer(config)
        if own_server:
            srv.start()
        try:
            ro = _Rollout(config, store, srv, model, devices, chunk_bytes=chunk_bytes, wait_health=wait_health, echo=echo,
                          allow_downgrade=allow_downgrade)  # fmt: skip
            ro.begin(target, canaries, min_success, canary)
            echo(f"rollout {ro.id}: {model.version} ({model.size} bytes) to {len(devices)} device(s): {', '.join(devices)}")
            results: dict[str, str] = {}
            reasons: dict[str, str] = {}
            need_all = math.ceil(min_success * len(devices) - 1e-9)
            if canaries:
                halted = _canary_phase(ro, config, store, devices, canaries, min_success, timeout_s, results, reasons, echo)
                if halted is not None:
                    return halted
            rest = [d for d in devices if d not in canaries]
            if rest:
                ro.deploy(rest)
                # Canary successes count towards the whole rollout's --min-success.
                need = need_all - sum(1 for v in results.values() if v == SUCCESS)
                res, why = ro.wait(rest, ro.transfer, model.version, need, timeout_s)
                results.update(res)
                reasons.update(why)
            ok = sum(1 for v in results.values() if v == SUCCESS)
            ratio = ok / len(devices)
            if ratio < min_success:
                # Devices failed after the canaries passed (or without canaries): stop here
                # and send back every device that may have taken the new model.
                echo(f"{ok}/{len(devices)} succeeded, below {min_success:.0%}: halting, rolling back")
                phase = "in main phase" if canaries else "without canaries"
                return _halt(ro, config, store, devices, results, reasons, timeout_s,
                             f"halted {phase}: {ok}/{len(devices)} succeeded, {need_all} needed")  # fmt: skip
            msg = f"{ok}/{len(devices)} devices on {model.version}"
            ro.set_state("done", msg)
            echo(f"rollout {ro.id} done: {msg}")
            return RolloutOutcome(ro.id, model.version, "done", tuple(canaries), results, reasons, ratio, msg)
        finally:
            if own_server:
                srv.stop()
                srv.join()
    finally:
        store.close()


def _halt(
    ro: _Rollout,
    config: CloudConfig,
    store: SQLiteStore,
    deployed: list[str],
    results: dict[str, str],
    reasons: dict[str, str],
    timeout_s: float,
    message: str,
) -> RolloutOutcome:
    """Stop a rollout: every deployed device that did not fail goes back to its previous version.

    A device that failed either refused the model (it never switched) or rolled itself back
    after its health watch; the others succeeded or are still on their way, so they may hold
    the new model. The rollout row ends ``halted`` with a message naming what was rolled back.
    """
    took = [d for d in deployed if results.get(d) != FAILURE]
    rb = ro.roll_back(took, Registry(config, store), min(timeout_s, 120.0)) if took else {}
    for d, what in rb.items():
        reasons[d] = f"{reasons.get(d, 'succeeded')}; {what}"
    # devices answer in any order; name them sorted so the message reads the same every time
    back = [d for d, what in sorted(rb.items()) if what == "rolled back"]
    not_back = [f"{d} ({what})" for d, what in sorted(rb.items()) if what != "rolled back"]
    if took:
        message += f"; rolled back {len(back)} of {len(took)}" + (f": {', '.join(back)}" if back else "")
    else:
        message += "; nothing to roll back (every deployed device refused the model or went back by itself)"
    if not_back:
        message += f"; not rolled back: {', '.join(not_back)}"
    ro.set_state("halted", message)
    ro.echo(f"rollout {ro.id} halted: {message}")
    ok = sum(1 for v in results.values() if v == SUCCESS)
    return RolloutOutcome(ro.id, ro.model.version, "halted", ro.canaries, results, reasons, ok / len(ro.devices), message, rb)


def rollout_status(config: CloudConfig, rollout_id: str | None = None) -> dict[str, Any]:
    """The latest (or named) rollout and each of its devices' state, plus every device's last OTA state."""
    store = open_ota_store(config)
    try:
        conn = store.db.conn
        if rollout_id:
            ro = conn.execute("SELECT * FROM ota_rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if ro is None:
                raise CloudError(f"no rollout {rollout_id!r}; `linewatch cloud rollout status` shows the latest")
        else:
            ro = conn.execute("SELECT * FROM ota_rollouts ORDER BY created DESC LIMIT 1").fetchone()
        deployments = []
        if ro is not None:
            deployments = [dict(r) for r in conn.execute("SELECT * FROM ota_deployments WHERE rollout = ? ORDER BY device_id", (ro["id"],))]
        devices = [dict(r) for r in conn.execute("SELECT * FROM ota_device_state ORDER BY device_id")]
        return {"rollout": dict(ro) if ro is not None else None, "deployments": deployments, "devices": devices}
    finally:
        store.close()


__all__ = [
    "RolloutOutcome",
    "parse_canary",
    "record_state",
    "resolve_targets",
    "rollout_status",
    "run_push",
]
