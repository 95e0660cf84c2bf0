"""The cloud end of an OTA transfer: serve chunks, record device states, publish desired.

:class:`OtaServer` is the cloud end of the transfer in docs/ota.md. It subscribes to every
device's ``ota/req`` and ``ota/state``, answers each request with binary chunks read from
the registry file (``edge.ota_wire.encode_chunk``), records every state in the store
(``ota_device_state``, ``ota_deployments``, through :func:`cloud.rollout.record_state`),
and publishes the RETAINED ``ota/desired`` messages. It runs inside ``linewatch cloud
push`` while the push waits (the simple case), or inside ``cloud serve`` through
:func:`start_ota_server`. Requests arrive through the shared subscription
``$share/linewatch-ota/...``, so when both run, each request is answered by one of them;
any server finds a transfer in the store (``ota_transfers``).

Which devices get a model, and when, is the rollout policy in cloud/rollout.py.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud.config import CloudConfig
from cloud.exceptions import CloudError
from cloud.registry import Registry, open_ota_store
from cloud.store import SQLiteStore
from edge.mqtt import LinkSettings, make_client
from edge.ota_wire import (
    OTA,
    REQ,
    STATE,
    OtaDesired,
    OtaRequest,
    OtaStatePayload,
    encode_chunk,
    ota_topic,
    parse_json,
)
from edge.protocol import shared_filter, topic

logger = logging.getLogger(__name__)

SHARE_GROUP = "linewatch-ota"


def _device_of(prefix: str, name: str, kind: str) -> str | None:
    head = prefix.rstrip("/") + "/devices/"
    if not name.startswith(head) or not name.endswith(f"/{OTA}/{kind}"):
        return None
    dev = name[len(head) : -len(f"/{OTA}/{kind}")]
    return dev if dev and "/" not in dev else None


@dataclass(frozen=True)
class Transfer:
    """A packed file offered under a transfer id, cut in ``chunk_bytes`` chunks."""

    transfer: str
    path: Path
    sha256: str
    size: int
    chunk_bytes: int

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_bytes)


class OtaServer:
    """Serves chunk requests, records device states, publishes desired messages.

    One paho client (its own network thread) and one worker thread that owns a store
    connection: callbacks only queue, the worker reads files and publishes chunks.
    """

    def __init__(self, config: CloudConfig, *, client_id: str | None = None, rate_limit_bps: float | None = None) -> None:
        self.config = config
        # Chunk bytes per second this server sends at most (None: as fast as the link goes),
        # so a rollout never saturates a plant's uplink.
        self.rate_limit_bps = rate_limit_bps
        self._next_send = 0.0
        self.prefix = config.mqtt.topic_prefix
        self.client_id = client_id or f"linewatch-ota-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.stop_event = threading.Event()
        self.stats: dict[str, int] = {
            "requests": 0, "chunks_sent": 0, "chunk_bytes_sent": 0, "bytes_sent": 0, "bytes_received": 0,
            "unknown_transfer": 0, "bad_requests": 0, "states": 0, "store_errors": 0, "stale_requests": 0,
        }  # fmt: skip
        self.sent: dict[tuple[str, str, int], int] = {}  # (device, transfer, index) -> times sent
        self.states: dict[str, OtaStatePayload] = {}
        self._cond = threading.Condition()
        self._transfers: dict[str, Transfer] = {}
        self._inbox: queue.Queue[tuple[str, str, bytes, int]] = queue.Queue()
        self._connected = threading.Event()
        # Which connection a message came in on (one more per CONNACK): a chunk request is
        # answered only on the connection it arrived on (see _serve).
        self._link = 0
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[OtaStatePayload], None]] = []
        c = make_client(LinkSettings.of(config.mqtt, client_id=self.client_id), max_inflight_messages=64)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, wait_s: float = 10.0) -> None:
        """Connect and start serving; raises :class:`CloudError` if the broker is unreachable."""
        cfg = self.config.mqtt
        self._thread = threading.Thread(target=self._main, name="ota-server", daemon=True)
        self._thread.start()
        self.client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        self.client.loop_start()
        if wait_s > 0 and not self._connected.wait(wait_s):
            self.stop()
            self.join()
            raise CloudError(f"cannot reach the MQTT broker at {cfg.host}:{cfg.port}; check mqtt.host/mqtt.port in the cloud config")

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        """True once the broker accepted the connection (False after ``timeout``)."""
        return self._connected.wait(timeout)

    def add_listener(self, fn: Callable[[OtaStatePayload], None]) -> None:
        """Call ``fn`` (on the worker thread) with every device state received."""
        self._listeners.append(fn)

    def offer(self, transfer: Transfer) -> None:
        """Serve ``transfer`` from this process (also recorded in the store by run_push)."""
        self._transfers[transfer.transfer] = transfer

    # -- desired ---------------------------------------------------------------------------------

    def publish_desired(self, desired: OtaDesired, *, timeout: float = 10.0) -> None:
        """RETAINED desired message for one device; waits until the broker has it."""
        name = ota_topic(self.prefix, desired.device_id, "desired")
        payload = desired.model_dump_json(exclude_none=True).encode()
        self.stats["bytes_sent"] += len(payload) + len(name)
        info = self.client.publish(name, payload, qos=1, retain=True)
        info.wait_for_publish(timeout)

    def clear_desired(self, device_id: str, *, timeout: float = 10.0) -> None:
        """Remove a device's retained desired message (it keeps whatever it runs)."""
        self.client.publish(ota_topic(self.prefix, device_id, "desired"), b"", qos=1, retain=True).wait_for_publish(timeout)

    # -- paho callbacks ------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        if reason_code.is_failure:
            logger.warning("OTA server: broker refused the connection: %s", reason_code)
            return
        # Requests through a shared subscription: with a server in `cloud serve` and one in a
        # `cloud push`, each request is answered once. States go to every server.
        client.subscribe([(shared_filter(SHARE_GROUP, topic(self.prefix, "+", OTA, REQ)), 1), (topic(self.prefix, "+", OTA, STATE), 1)])
        self._link += 1
        self._connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        self._connected.clear()
        if not self.stop_event.is_set():
            logger.info("OTA server: link lost (%s); reconnecting", reason_code)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats["bytes_received"] += len(msg.payload) + len(msg.topic)
        kind = msg.topic.rsplit("/", 1)[-1]
        self._inbox.put((kind, msg.topic, bytes(msg.payload), self._link))

    # -- worker ----------------------------------------------------------------------------------

    def _main(self) -> None:
        store: SQLiteStore | None = None
        files: dict[Path, int] = {}
        try:
            store = open_ota_store(self.config)
            while not self.stop_event.is_set():
                try:
                    kind, name, payload, link = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    if kind == REQ:
                        self._serve(store, files, name, payload, link)
                    elif kind == STATE:
                        self._record_state(store, name, payload)
                except Exception:  # noqa: BLE001 - the server outlives one bad message
                    logger.exception("OTA server: message on %s not handled", name)
        finally:
            for fd in files.values():
                os.close(fd)
            if store is not None:
                store.close()

    def _lookup(self, store: SQLiteStore, transfer: str) -> Transfer | None:
        t = self._transfers.get(transfer)
        if t is not None:
            return t
        row = store.db.conn.execute(
            "SELECT t.transfer, t.sha256, t.chunk_bytes, m.size, m.file FROM ota_transfers t "
            "JOIN ota_models m ON m.sha256 = t.sha256 WHERE t.transfer = ?",
            (transfer,),
        ).fetchone()
        if row is None:
            return None
        t = Transfer(transfer, Registry(self.config, store).root / row["file"], row["sha256"], int(row["size"]), int(row["chunk_bytes"]))
        self._transfers[transfer] = t
        return t

    def _serve(self, store: SQLiteStore, files: dict[Path, int], name: str, payload: bytes, link: int) -> None:
        """Publish the chunks a device asked for.

        Only while the connection the request came in on is up: chunks published into a
        broken link are queued by paho and flushed at the reconnect, often before the
        device has subscribed again on a broker that lost its session (they would be lost
        and asked for again: sent twice). The device asks again for what it misses (it
        probes first after a lost session, edge/ota.py), and when the broker kept its
        session it asks again after RESUME_GRACE_S.
        """
        device = _device_of(self.prefix, name, REQ)
        try:
            req = parse_json(OtaRequest, payload)
        except ValueError as exc:
            self.stats["bad_requests"] += 1
            logger.debug("bad OTA request on %s: %s", name, exc)
            return
        if device is None or req.device_id != device:
            self.stats["bad_requests"] += 1
            return
        self.stats["requests"] += 1
        t = self._lookup(store, req.transfer)
        if t is None:
            self.stats["unknown_transfer"] += 1
            logger.info("OTA server: %s asked for unknown transfer %s", device, req.transfer)
            return
        fd = files.get(t.path)
        if fd is None:
            fd = files[t.path] = os.open(t.path, os.O_RDONLY)
        out = ota_topic(self.prefix, device, "chunk")
        for i in req.indexes:
            if i >= t.chunks:
                self.stats["bad_requests"] += 1
                continue
            data = os.pread(fd, t.chunk_bytes, i * t.chunk_bytes)
            self._pace(len(data))
            if link != self._link or not self._connected.is_set():
                self.stats["stale_requests"] += 1
                logger.debug("OTA server: link to the broker changed; dropping %s's request for %s", device, req.indexes)
                return
            msg = encode_chunk(t.transfer, i, data)
            self.client.publish(out, msg, qos=1)
            self.stats["chunks_sent"] += 1
            self.stats["chunk_bytes_sent"] += len(data)
            self.stats["bytes_sent"] += len(msg) + len(out)
            key = (device, t.transfer, i)
            self.sent[key] = self.sent.get(key, 0) + 1

    def _pace(self, nbytes: int) -> None:
        if not self.rate_limit_bps:
            return
        now = time.monotonic()
        self._next_send = max(self._next_send, now)
        wait = self._next_send - now
        if wait > 0:
            self.stop_event.wait(wait)
        self._next_send += nbytes / self.rate_limit_bps

    def _record_state(self, store: SQLiteStore, name: str, payload: bytes) -> None:
        device = _device_of(self.prefix, name, STATE)
        if not payload or device is None:
            return
        try:
            st = parse_json(OtaStatePayload, payload)
        except ValueError as exc:
            logger.debug("bad OTA state on %s: %s", name, exc)
            return
        if st.device_id != device:
            return
        self.stats["states"] += 1
        # record_state sits with the rollout tables it updates; cloud.rollout imports this module.
        from cloud.rollout import record_state

        try:
            record_state(store, st)
        except sqlite3.Error as exc:
            self.stats["store_errors"] += 1
            logger.warning("OTA state of %s not stored: %s", device, exc)
        with self._cond:
            self.states[device] = st
            self._cond.notify_all()
        for fn in self._listeners:
            fn(st)

    def wait_change(self, timeout: float) -> None:
        """Block until a state arrives or ``timeout`` passes."""
        with self._cond:
            self._cond.wait(timeout)




def start_ota_server(config: CloudConfig) -> OtaServer:
    """For ``cloud serve``: a chunk server that runs until ``stop()``/``join()``."""
    server = OtaServer(config)
    server.start(wait_s=0)
    return server


__all__ = ["SHARE_GROUP", "OtaServer", "Transfer", "start_ota_server"]
