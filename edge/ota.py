"""Over-the-air model updates on the device: receive, verify, validate, switch, watch.

:class:`OtaClient` receives bundles over MQTT (its own paho client, independent of the sync
client), resumes transfers after cuts, runs :func:`edge.install.install_bundle`, hands the
new model to the agent, reports states, and rolls back when the new model misbehaves in its
first ``ota.health_parts`` parts. The wire protocol is in docs/ota.md.

The parts live in a module each; their names are re-exported here for existing importers:

=================== ===================================================================
edge/install.py     install_bundle and its stages, recover_store, prune_versions
edge/ota_wire.py    topics, payload models (OtaDesired, OtaRequest, OtaStatePayload),
                    the binary chunk format, device states
edge/download.py    Download (bundle.part + on-disk bitmap)
edge/health.py      HealthWatch, HealthVerdict
edge/ota.py         OtaClient: the MQTT client and its worker thread
=================== ===================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import ssl
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import AgentConfig
from edge.download import DOWNLOADS, Download
from edge.exceptions import BundleError, LinewatchError
from edge.fsutil import atomic_write, sha256_file
from edge.health import HealthVerdict, HealthWatch
from edge.inference import Classifier, Prediction, check_golden
from edge.install import (
    InstallStage,
    install_bundle,
    recover_store,
    rmtree,
)
from edge.models import ModelStore
from edge.mqtt import LinkSettings, make_client
from edge.ota_wire import (
    ACTIVE,
    CHUNK,
    DESIRED,
    DOWNLOADING,
    FAILED,
    HEALTH_OK,
    HEALTH_WATCHING,
    MAX_REQ_INDEXES,
    OTA_USER_SUFFIX,
    REQ,
    ROLLED_BACK,
    STATE,
    VALIDATING,
    VERIFYING,
    OtaDesired,
    OtaRequest,
    OtaStatePayload,
    decode_chunk,
    downgrade_signed,
    is_downgrade,
    ota_topic,
    parse_json,
)
from edge.protocol import read_manifest
from edge.signing import load_trusted_keys

logger = logging.getLogger(__name__)


class AgentLike(Protocol):
    """What :class:`OtaClient` needs from the agent (edge.agent.Agent has all of it)."""

    classifier: Classifier

    def swap_model(self, classifier: Classifier) -> None: ...

    def note_event(self, kind: str, **detail: Any) -> None: ...


STATE_FILE = "ota-state.json"
# The broker keeps an offline device's OTA session (and chunks sent to it) this long.
SESSION_EXPIRY_S = 3600
OTA_THREAD_NICE = 10
# After a reconnect to a kept session, how long to wait for replies to earlier requests.
RESUME_GRACE_S = 1.0


class OtaClient:
    """Receives models over MQTT, installs them with :func:`install_bundle`, watches them.

    Runs its own paho client (client id ``<device_id>-ota``) and one worker thread that
    owns the download and the store; MQTT callbacks only queue messages for it, so a slow
    disk never stalls the network loop and nothing here ever blocks inspection. The
    agent calls :meth:`observe` (and :meth:`observe_error`) once per decision.

    ``agent`` may be None (a bench or a box without the inspection loop): the store is
    then still updated, and the running model is read from it.
    """

    def __init__(
        self,
        config: AgentConfig,
        agent: AgentLike | None = None,
        *,
        window: int = 4,
        request_timeout_s: float = 5.0,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.config = config
        self.agent = agent
        self.store = ModelStore(config.model.path)
        self.prefix = config.mqtt.topic_prefix
        self.device_id = config.device_id
        self.window = max(1, window)
        self.request_timeout_s = request_timeout_s
        self.progress_interval_s = progress_interval_s
        self.stop_event = threading.Event()
        self.stats: dict[str, int] = {
            "chunks": 0, "duplicates": 0, "corrupt": 0, "unknown_transfer": 0, "bad_messages": 0,
            "requests": 0, "requested_chunks": 0, "re_requested": 0, "bytes_in": 0, "bytes_out": 0,
            "installs": 0, "refusals": 0, "rollbacks": 0,
        }  # fmt: skip
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: Classifier | None = agent.classifier if agent is not None else None
        self._desired: OtaDesired | None = None
        self._dl: Download | None = None
        self._todo: deque[int] = deque()
        self._outstanding: dict[int, float] = {}
        # After a lost session: the one chunk asked for until its reply is in (see _handle_connected).
        self._probe: int | None = None
        self._verify_failures = 0
        self._session_present: bool | None = None  # of the last connection; None before one
        self._last_progress = 0.0
        self._persisted: dict[str, Any] = {}
        self._last_state: OtaStatePayload | None = None
        self._watch: HealthWatch | None = None
        self._baseline: deque[tuple[bool, tuple[int, ...]]] = deque(maxlen=max(50, min(1000, config.ota.health_parts)))
        self.setup_error: str | None = None  # why OTA is off (its MQTT TLS setup failed)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background: a missing broker never blocks) and start the worker."""
        if not self.store.is_single_bundle:
            recover_store(self.store)
        self._persisted = self._load_persisted()
        cfg = self.config.mqtt
        settings = LinkSettings.of(cfg, client_id=f"{self.device_id}-ota")
        if cfg.username:
            # Its own user: the broker's device listener makes the client id the username
            # (use_username_as_clientid), so the sync link and this one need two.
            settings = replace(settings, username=f"{cfg.username}{OTA_USER_SUFFIX}")
        try:
            client = make_client(settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # A wrong path must not stop the agent (under systemd: a restart loop with no
            # inspection). No OTA until the config is fixed; the status says why.
            self.setup_error = (f"OTA off: TLS setup failed ({exc}); fix mqtt.ca_file/cert_file/key_file"
                                " (`linewatch edge validate-config`) and restart the agent")  # fmt: skip
            logger.error("%s", self.setup_error)
            return
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        # Before connecting: chunks the broker kept for our session must find their download.
        self._restore_download()
        # A persistent session: chunks in flight when the link or this process dies wait in
        # the broker and arrive after the reconnect, so they are not requested twice.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False, properties=props)
        client.loop_start()
        self._thread = threading.Thread(target=self._main, name="ota", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float = 2.0) -> None:
        """Disconnect, wait for the worker, keep what arrived; a download resumes next start.

        The link goes first so that no chunk is acknowledged to the broker and then lost:
        chunks already received are written before returning, the rest wait in the
        broker's session for the next start.
        """
        deadline = time.monotonic() + timeout
        if self._client is not None:
            try:
                self._client.disconnect()
            finally:
                self._client.loop_stop()
        if self._thread is not None:
            self._thread.join(max(0.05, deadline - time.monotonic()))
        if self._thread is None or not self._thread.is_alive():
            self._drain_chunks()
        if self._dl is not None:
            self._dl.sync()
            self._dl.close()

    def _drain_chunks(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == CHUNK:
                try:
                    self._handle_chunk(item)
                except OSError as exc:
                    logger.warning("chunk not kept at shutdown: %s", exc)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def state(self) -> dict[str, Any] | None:
        """The last state reported (for the agent's status), or None before any update."""
        if self.setup_error is not None:
            return {"state": "off", "reason": self.setup_error}
        s = self._last_state
        return None if s is None else s.model_dump(exclude_none=True)

    # -- hooks the agent calls -------------------------------------------------------------

    def observe(self, prediction: Prediction, model_version: str | None = None) -> None:
        """One decision of the running model (cheap: called by the inspection loop per part)."""
        version = model_version or self._running_version()
        with self._lock:
            watch = self._watch
            if watch is not None and version == watch.version:
                verdict = watch.add(prediction)
                if verdict is not None:
                    self._inbox.put(("health", verdict))
            else:
                self._baseline.append((prediction.passed, tuple(prediction.raw)))

    def observe_error(self, error: BaseException | str, model_version: str | None = None) -> None:
        """One frame the running model could not decide (invoke error)."""
        version = model_version or self._running_version()
        with self._lock:
            watch = self._watch
            if watch is not None and version == watch.version:
                verdict = watch.add_error(str(error))
                if verdict is not None:
                    self._inbox.put(("health", verdict))

    def _running_version(self) -> str | None:
        clf = self.agent.classifier if self.agent is not None else self._current
        return clf.version if clf is not None else None

    # -- MQTT callbacks (paho's thread): queue and return ----------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            logger.warning("OTA connection to %s:%s refused: %s", self.config.mqtt.host, self.config.mqtt.port, reason_code)
            return
        _lower_priority()  # paho's network thread: the line's inference comes first
        client.subscribe(
            [(ota_topic(self.prefix, self.device_id, DESIRED), 1), (ota_topic(self.prefix, self.device_id, CHUNK), 1)]
        )
        self._connected.set()
        self._inbox.put(("connected", bool(getattr(flags, "session_present", False))))

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self._connected.clear()
        if not self.stop_event.is_set():
            logger.info("OTA link lost (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats["bytes_in"] += len(msg.payload) + len(msg.topic)
        kind = msg.topic.rsplit("/", 1)[-1]
        if kind in (DESIRED, CHUNK):
            self._inbox.put((kind, bytes(msg.payload)))

    def _publish(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        if self._client is None:
            return
        name = ota_topic(self.prefix, self.device_id, kind)
        self.stats["bytes_out"] += len(payload) + len(name)
        self._client.publish(name, payload, qos=1, retain=retain)

    # -- the worker ------------------------------------------------------------------------

    def _main(self) -> None:
        _lower_priority()
        while not self.stop_event.is_set():
            try:
                kind, item = self._inbox.get(timeout=0.2)
            except queue.Empty:
                kind, item = "", None
            try:
                if kind == "connected":
                    self._handle_connected(bool(item))
                elif kind == DESIRED:
                    self._handle_desired(item)
                elif kind == CHUNK:
                    self._handle_chunk(item)
                elif kind == "health":
                    self._handle_health(item)
                self._pump()
            except Exception:  # noqa: BLE001 - the OTA worker must outlive any one bad update
                logger.exception("OTA worker error (continuing)")
                time.sleep(0.2)

    def _handle_connected(self, session_present: bool) -> None:
        self._session_present = session_present
        if self._last_state is not None:
            # the broker may have lost the retained state (restart without persistence)
            self._publish(STATE, self._last_state.model_dump_json(exclude_none=True).encode(), retain=True)
        if self._dl is None:
            return
        if session_present:
            # the broker kept our session: replies to requests in flight come right after
            # the CONNACK; wait RESUME_GRACE_S for them before asking again
            since = time.monotonic() - max(0.0, self.request_timeout_s - RESUME_GRACE_S)
            for i in self._outstanding:
                self._outstanding[i] = since
        elif self._outstanding:
            self._probe_after_lost_session(self._dl)

    def _probe_after_lost_session(self, dl: Download) -> None:
        """The session is gone (a broker restarted without persistence, or it expired).

        Replies to the requests in flight may be lost, or still on their way: the cloud's
        client sends again what the old broker had not acknowledged, and serves the
        requests it already had. Asking again for all of them at once would get many sent
        twice. So ask for ONE chunk first, one never asked for if there is one: the cloud
        answers requests in order, so when its reply is in, whatever was still coming has
        come. Then the window reopens and only what is still missing is asked for again.
        """
        suspect = sorted(self._outstanding)
        self._outstanding.clear()
        fresh = next((i for i in self._todo if not dl.has(i) and i not in suspect), None)
        probe = fresh if fresh is not None else suspect[0]
        rest = [i for i in self._todo if i != probe and i not in suspect]
        self._todo = deque([probe, *(i for i in suspect if i != probe), *rest])
        self._probe = probe
        logger.info("OTA %s: session lost with %d chunk(s) in flight; probing with chunk %d", dl.desired.transfer, len(suspect), probe)

    def _handle_desired(self, payload: bytes) -> None:
        if not payload:
            return  # retained message cleared by the cloud
        try:
            desired = parse_json(OtaDesired, payload)
        except ValueError as exc:
            self.stats["bad_messages"] += 1
            logger.warning("ignoring a bad OTA desired message: %s", exc)
            return
        if desired.device_id != self.device_id:
            self.stats["bad_messages"] += 1
            return
        if self._dl is not None and self._dl.desired.transfer == desired.transfer and self._dl.desired.sha256 == desired.sha256:
            self._desired = desired  # the same delivery announced again (reconnect): carry on
            return
        done = self._persisted
        if done.get("transfer") == desired.transfer and done.get("state") in (FAILED, ROLLED_BACK):
            # Already refused or rolled back: never retried automatically; re-report.
            self._desired = desired
            self._report(done["state"], desired, reason=done.get("reason"), stage=done.get("stage"), note=False)
            return
        self._abandon_download()
        self._prune_downloads(keep=desired.transfer)
        self._desired = desired
        running = self._running_version()
        if running == desired.version:
            same = done.get("transfer") == desired.transfer
            watching = self._watch is not None and self._watch.verdict is None
            if same and done.get("health") == HEALTH_WATCHING and not watching:
                # restarted during the health watch: watch again (no baseline: NaN and errors only)
                with self._lock:
                    self._watch = HealthWatch(desired.version, self.config.ota.health_parts, [])
                watching = True
            self._finish(ACTIVE, desired, health=HEALTH_WATCHING if watching else HEALTH_OK, note=not same)
            return
        if is_downgrade(desired.version, running) and not self._downgrade_allowed(desired):
            self.stats["refusals"] += 1
            self._finish(FAILED, desired, stage=InstallStage.DOWNGRADE,
                         reason=f"version {desired.version} is older than the running {running}; anti-rollback refuses it"
                                " unless the push says --allow-downgrade (signed)")  # fmt: skip
            return
        prev = self.store.previous() if not self.store.is_single_bundle else None
        if prev is not None and _version_of(prev) == desired.version:
            self._switch_to_previous(desired)
            return
        if not desired.download:
            self._finish(
                FAILED,
                desired,
                stage=InstallStage.DESIRED,
                reason=f"version {desired.version} is not on this device and no download was offered",
            )
            return
        if self.store.is_single_bundle:
            self._finish(
                FAILED,
                desired,
                stage=InstallStage.STORE,
                reason=f"{self.store.root} holds a single bundle; point model.path at a store folder to receive OTA updates",
            )
            return
        self._start_download(desired)

    def _downgrade_allowed(self, desired: OtaDesired) -> bool:
        """The push asked for a downgrade, and a trusted key signed that (any ask, if unsigned models are allowed)."""
        if not desired.allow_downgrade:
            return False
        if self.config.ota.allow_unsigned:
            return True
        try:
            trusted = load_trusted_keys(self.config.ota.trusted_keys)
        except LinewatchError as exc:
            logger.warning("cannot check a downgrade's signature: %s", exc)
            return False
        return downgrade_signed(desired, dict(trusted))

    def _abandon_download(self) -> None:
        """Drop the download in progress (a newer desired replaced it); its folder goes too."""
        if self._dl is not None:
            self._dl.remove()
            self._dl = None
        self._todo.clear()
        self._outstanding.clear()
        self._probe = None

    def _prune_downloads(self, keep: str) -> None:
        """Partial downloads of older desired messages are never needed again."""
        downloads = self.store.root / DOWNLOADS
        if self.store.is_single_bundle or not downloads.is_dir():
            return
        for p in downloads.iterdir():
            if p.name != keep:
                rmtree(p)

    def _restore_download(self) -> None:
        """Pick up the download a previous run left (its meta.json is the desired message)."""
        downloads = self.store.root / DOWNLOADS
        if self.store.is_single_bundle or not downloads.is_dir():
            return
        for d in sorted(downloads.iterdir()):
            try:
                desired = parse_json(OtaDesired, (d / "meta.json").read_bytes())
            except (OSError, ValueError):
                continue
            done = self._persisted
            if desired.device_id != self.device_id or not desired.download or done.get("transfer") == desired.transfer:
                continue
            self._desired = desired
            self._start_download(desired)
            return

    def _start_download(self, desired: OtaDesired) -> None:
        dl = Download(self.store.root / DOWNLOADS, desired)
        self._dl = dl
        self._todo = deque(dl.missing())
        self._outstanding.clear()
        self._probe = None
        if self._session_present is False:
            self._todo.extendleft(reversed(dl.requested()))
        else:
            # requested before a restart: the broker may still hold the replies for us
            since = time.monotonic() - max(0.0, self.request_timeout_s - RESUME_GRACE_S)
            self._outstanding = {i: since for i in dl.requested()}
        self._verify_failures = 0
        logger.info(
            "OTA %s: %s %s (%d bytes, %d chunks, %d already here)",
            desired.transfer, "resuming" if dl.resumed else "downloading", desired.version, desired.size, desired.chunks, dl.received,
        )
        self._report(DOWNLOADING, desired, note=True, detail={"size": desired.size, "resumed": dl.received})

    def _handle_chunk(self, payload: bytes) -> None:
        try:
            transfer, index, digest, data = decode_chunk(payload)
        except ValueError:
            self.stats["bad_messages"] += 1
            return
        dl = self._dl
        if dl is None or transfer != dl.desired.transfer:
            self.stats["unknown_transfer"] += 1
            return
        if not 0 <= index < dl.chunks:
            self.stats["bad_messages"] += 1
            return
        self._outstanding.pop(index, None)
        if index == self._probe:
            self._probe = None  # the cloud's backlog has drained: reopen the window
        if dl.has(index):
            self.stats["duplicates"] += 1
            return
        if hashlib.sha256(data).digest() != digest or len(data) != dl.expected_len(index):
            self.stats["corrupt"] += 1
            self._todo.appendleft(index)  # ask again at once
            return
        dl.write(index, data)
        self.stats["chunks"] += 1

    def _pump(self) -> None:
        dl = self._dl
        if dl is None:
            return
        if dl.complete:
            self._complete_download(dl)
            return
        now = time.monotonic()
        late = [i for i, t in self._outstanding.items() if now - t > self.request_timeout_s]
        for i in sorted(late, reverse=True):
            del self._outstanding[i]
            self._todo.appendleft(i)
            self.stats["re_requested"] += 1
        window = 1 if self._probe is not None else self.window
        # Ask in batches of half a window rather than one chunk per chunk received: half the
        # request messages (and their acks), so less Python work per chunk on the box, where
        # it shares the interpreter with the inspection loop.
        if self._connected.is_set() and (window - len(self._outstanding) >= max(1, window // 2) or not self._outstanding):
            want: list[int] = []
            while self._todo and len(self._outstanding) + len(want) < window and len(want) < MAX_REQ_INDEXES:
                i = self._todo.popleft()
                if not dl.has(i) and i not in self._outstanding:
                    want.append(i)
            if want:
                req = OtaRequest(v=1, device_id=self.device_id, transfer=dl.desired.transfer, indexes=want)
                self._publish(REQ, req.model_dump_json().encode())
                self.stats["requests"] += 1
                self.stats["requested_chunks"] += len(want)
                for i in want:
                    self._outstanding[i] = now
                dl.mark_requested(want)
        if now - self._last_progress >= self.progress_interval_s:
            self._report(DOWNLOADING, dl.desired, note=False)

    def _complete_download(self, dl: Download) -> None:
        desired = dl.desired
        self._report(VERIFYING, desired, note=True)
        dl.sync()
        actual = sha256_file(dl.part)
        if actual != desired.sha256:
            self._verify_failures += 1
            if self._verify_failures >= 2:
                dl.remove()
                self._dl = None
                self._finish(
                    FAILED,
                    desired,
                    stage=InstallStage.TRANSFER,
                    reason=f"packed bundle sha256 {actual[:12]}… != {str(desired.sha256)[:12]}… twice; "
                    "the registry copy may be damaged",
                )
                return
            logger.warning("OTA %s: whole-file sha256 mismatch; downloading again", desired.transfer)
            dl.reset()
            self._todo = deque(dl.missing())
            self._outstanding.clear()
            self._probe = None
            self._report(DOWNLOADING, desired, note=True, detail={"restart": "sha256 mismatch"})
            return
        self._report(VALIDATING, desired, note=True)
        result = install_bundle(
            dl.part, self.store, self.config.ota, self._current_classifier(),
            runtime=self.config.model.runtime, num_threads=self.config.model.threads,
            allow_downgrade=self._downgrade_allowed(desired),
        )  # fmt: skip
        dl.remove()
        self._dl = None
        if not result.ok:
            self.stats["refusals"] += 1
            self._finish(FAILED, desired, stage=result.stage, reason=result.reason)
            return
        self.stats["installs"] += 1
        if result.version != desired.version:
            logger.warning("OTA %s: bundle version %s, desired said %s", desired.transfer, result.version, desired.version)
        assert result.classifier is not None
        if not result.already_active:
            self._swap(result.classifier)
            with self._lock:
                self._watch = HealthWatch(result.classifier.version, self.config.ota.health_parts, list(self._baseline))
        self._finish(ACTIVE, desired, health=HEALTH_WATCHING if not result.already_active else HEALTH_OK)

    def _current_classifier(self) -> Classifier | None:
        if self._current is None and not self.store.is_single_bundle:
            try:
                self._current = Classifier(self.store.current(), runtime=self.config.model.runtime)
            except LinewatchError as exc:
                logger.warning("no running model to compare the new one with: %s", exc)
        return self._current

    def _swap(self, classifier: Classifier) -> None:
        self._current = classifier
        if self.agent is not None:
            self.agent.swap_model(classifier)

    def _switch_to_previous(self, desired: OtaDesired) -> None:
        """The desired version is the one kept for rollback: switch back without a download."""
        try:
            clf, reason = self._load_previous()
        except LinewatchError as exc:
            self._finish(FAILED, desired, stage=InstallStage.LOAD, reason=f"kept previous model unusable: {exc}")
            return
        if reason:
            self._finish(FAILED, desired, stage=InstallStage.GOLDEN, reason=reason)
            return
        self.store.rollback()
        with self._lock:
            self._watch = None
        self._swap(clf)
        self._finish(ACTIVE, desired, health=HEALTH_OK, detail={"switched_to": "previous"})

    def _load_previous(self) -> tuple[Classifier, str | None]:
        prev = self.store.previous()
        if prev is None:
            raise BundleError(f"no previous model in {self.store.root}")
        clf = Classifier(prev, runtime=self.config.model.runtime, num_threads=self.config.model.threads)
        golden = check_golden(clf)
        return clf, None if golden.ok else "previous model fails its golden images: " + "; ".join(golden.failures[:3])

    def _handle_health(self, verdict: HealthVerdict) -> None:
        desired = self._desired
        with self._lock:
            if self._watch is None or self._watch.version != verdict.version:
                return
            self._watch = None
        if verdict.ok:
            logger.info("model %s healthy after %d parts", verdict.version, verdict.parts)
            if self.agent is not None:
                self.agent.note_event("ota_healthy", version=verdict.version, parts=verdict.parts)
            if desired is not None and desired.version == verdict.version:
                self._finish(ACTIVE, desired, health=HEALTH_OK, note=False)
            return
        logger.warning("model %s unhealthy: %s; rolling back", verdict.version, verdict.reason)
        try:
            clf, golden_problem = self._load_previous()
            if golden_problem:
                raise BundleError(golden_problem)
            self.store.rollback()
        except LinewatchError as exc:
            logger.error("cannot roll back from %s: %s; keeping it", verdict.version, exc)
            if desired is not None:
                self._finish(ACTIVE, desired, health="unhealthy", reason=f"{verdict.reason}; rollback impossible: {exc}")
            return
        self._swap(clf)
        self.stats["rollbacks"] += 1
        if desired is not None:
            self._finish(ROLLED_BACK, desired, stage=InstallStage.HEALTH, reason=verdict.reason, detail={"to": clf.version})

    # -- reporting -------------------------------------------------------------------------

    def _report(
        self,
        state: str,
        desired: OtaDesired,
        *,
        stage: str | None = None,
        reason: str | None = None,
        health: str | None = None,
        note: bool = True,
        detail: dict[str, Any] | None = None,
    ) -> None:
        dl = self._dl if self._dl is not None and self._dl.desired.transfer == desired.transfer else None
        payload = OtaStatePayload(
            v=1,
            device_id=self.device_id,
            state=state,  # type: ignore[arg-type]
            transfer=desired.transfer,
            rollout=desired.rollout,
            version=desired.version,
            model_version=self._running_version_after_swap(),
            received=dl.received if dl is not None else None,
            chunks=desired.chunks,
            stage=stage,
            reason=reason[:1000] if reason else None,
            health=health,
            ts=time.time(),
        )
        if note and self.agent is not None:
            extra = {k: v for k, v in (("stage", stage), ("reason", reason), ("health", health)) if v}
            self.agent.note_event(
                f"ota_{state}",
                version=desired.version,
                transfer=desired.transfer,
                rollout=desired.rollout,
                **extra,
                **(detail or {}),
            )
        self._last_progress = time.monotonic()
        self._publish(STATE, payload.model_dump_json(exclude_none=True).encode(), retain=True)
        self._last_state = payload

    def _running_version_after_swap(self) -> str | None:
        # The agent picks a swapped model up at its next frame; report the one handed over.
        clf = self._current or (self.agent.classifier if self.agent is not None else None)
        return clf.version if clf is not None else None

    def _finish(self, state: str, desired: OtaDesired, **kwargs: Any) -> None:
        self._report(state, desired, **kwargs)
        self._persisted = {
            "transfer": desired.transfer, "rollout": desired.rollout, "version": desired.version, "state": state,
            "stage": kwargs.get("stage"), "reason": kwargs.get("reason"), "health": kwargs.get("health"), "ts": time.time(),
        }  # fmt: skip
        self._save_persisted()

    def _state_path(self) -> Path:
        return self.store.root / STATE_FILE

    def _load_persisted(self) -> dict[str, Any]:
        if self.store.is_single_bundle:
            return {}
        try:
            raw = json.loads(self._state_path().read_text())
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_persisted(self) -> None:
        if self.store.is_single_bundle:
            return
        path = self._state_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self._persisted))


def _lower_priority() -> None:
    """Nice the calling thread (Linux: per thread) so OTA work yields to inspection."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), OTA_THREAD_NICE)


def _version_of(bundle_dir: Path) -> str | None:
    try:
        return read_manifest(bundle_dir).version
    except BundleError:
        return None


__all__ = ["OTA_THREAD_NICE", "RESUME_GRACE_S", "SESSION_EXPIRY_S", "STATE_FILE", "AgentLike", "OtaClient"]
