"""MQTT ingest: validate what devices send, store it once, ack it only after the commit.

A worker subscribes with QoS 1 to

    $share/<group>/<prefix>/devices/+/results     (and gaps, events, samples)
    <prefix>/devices/+/status                      (plain: every worker sees every status)

so several workers (``linewatch cloud serve`` processes with the same ``ingest.share_group``)
split the data traffic between them. Status stays a plain subscription because brokers
differ on retained messages for shared subscriptions: MQTT 5 says a new shared
subscription gets none (EMQX, HiveMQ follow that), while Mosquitto 2.0 sends them anyway;
a plain one gets the retained status of every device on every broker.

For each data message: size, JSON, version, schema and "device in the payload = device in
the topic" are checked; a failure is counted (``counters`` table, ``rejected_<reason>``),
logged at most once per ``ingest.log_interval_s`` per reason, and dropped: ingest never
crashes on input. A valid batch is stored in ONE transaction (INSERT OR IGNORE on
(device_id, seq)); only after COMMIT is the ack published (QoS 1) to
``<prefix>/devices/<device_id>/ack``. A worker killed at any moment therefore never acked
what it did not store, and a batch it stored but did not ack is sent again by the device
and stored... nowhere new (the insert ignores it) and acked.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from cloud.config import CloudConfig
from cloud.exceptions import PayloadRejected, StoreError
from cloud.store import Store, StoreOutcome, open_store
from edge.backoff import Backoff
from edge.mqtt import LinkSettings, MqttLink
from edge.protocol import (
    ACK,
    DATA_MODELS,
    EVENTS,
    GAPS,
    MAX_PAYLOAD_BYTES,
    PAYLOAD_VERSION,
    RESULTS,
    SAMPLE_CHUNK_BYTES,
    SAMPLES,
    STATUS,
    EventsBatch,
    GapsBatch,
    ResultsBatch,
    SampleChunk,
    StatusPayload,
    device_topic_filter,
    encode_payload,
    parse_topic,
    read_versions,
    shared_filter,
    topic,
)

logger = logging.getLogger(__name__)

COUNTER_FLUSH_S = 0.5
DATA_TOPICS = (RESULTS, GAPS, EVENTS, SAMPLES)


class RateLimitedLog:
    """At most one warning per reason per interval, with how many were held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, reason: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < self.interval_s:
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        held = self._held.pop(reason, 0)
        self._last[reason] = now
        suffix = f" ({held} more like it not logged)" if held else ""
        logger.warning(msg + suffix, *args)


def decode(kind: str, device_in_topic: str, payload: bytes) -> Any:
    """Validate one data or status payload; raise :class:`PayloadRejected` with the reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadRejected("oversized", f"{len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} byte limit")
    model_cls = StatusPayload if kind == STATUS else DATA_MODELS[kind]
    try:
        # Fast path (pydantic parses the JSON itself, ~3x faster than json.loads + validate);
        # anything it refuses goes through the slow path below to be classified.
        fast = model_cls.model_validate_json(payload)
    except ValidationError:
        fast = None
    if fast is not None:
        if getattr(fast, "device_id", None) != device_in_topic:
            raise PayloadRejected("device_mismatch", f"payload says device {getattr(fast, 'device_id', None)!r}")
        return fast
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise PayloadRejected("json", f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(raw, dict):
        raise PayloadRejected("schema", f"a JSON {type(raw).__name__}, not an object")
    versions = read_versions(kind)
    if raw.get("v") not in versions:
        raise PayloadRejected(
            "version", f"payload version {str(raw.get('v'))[:20]!r}, this ingest reads {', '.join(map(str, versions))}"
        )
    try:
        model = model_cls.model_validate(raw)
    except (ValidationError, RecursionError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": "too deeply nested"}
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise PayloadRejected("schema", f"{where}: {first['msg']}") from None
    if getattr(model, "device_id", None) != device_in_topic:
        raise PayloadRejected("device_mismatch", f"payload says device {getattr(model, 'device_id', None)!r}")
    return model


def chunk_bytes(chunk: SampleChunk) -> bytes:
    """The decoded bytes of a sample chunk, checked against its declared place in the sample."""
    try:
        data = base64.b64decode(chunk.data, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadRejected("schema", "data: not base64") from None
    expected = SAMPLE_CHUNK_BYTES if chunk.chunk < chunk.chunks - 1 else chunk.bytes - SAMPLE_CHUNK_BYTES * (chunk.chunks - 1)
    if len(data) != expected:
        raise PayloadRejected("schema", f"chunk {chunk.chunk} has {len(data)} bytes, expected {expected}")
    return data


class Ingestor:
    """Turns MQTT messages into stored rows and acks; never raises out of :meth:`handle`."""

    def __init__(self, config: CloudConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.prefix = config.mqtt.topic_prefix
        self.publish: Any = None  # set by the worker: (topic, payload, qos) -> info
        self.log = RateLimitedLog(config.ingest.log_interval_s)
        self._counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}  # this worker's own counts since it started
        self._last_flush = time.monotonic()

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter (flushed to the store every COUNTER_FLUSH_S, not per message)."""
        if n:
            self._counts[name] = self._counts.get(name, 0) + n
            self.totals[name] = self.totals.get(name, 0) + n

    def tick(self, *, force: bool = False) -> None:
        """Flush counters if due; called by the worker loop between messages."""
        if not self._counts or (not force and time.monotonic() - self._last_flush < COUNTER_FLUSH_S):
            return
        counts, self._counts = self._counts, {}
        try:
            self.store.add_counters(counts)
            self._last_flush = time.monotonic()
        except (StoreError, sqlite3.Error) as exc:
            for k, v in counts.items():
                self._counts[k] = self._counts.get(k, 0) + v
            self.log.warn("counters", "counters not written: %s", exc)

    def handle(self, message: mqtt.MQTTMessage) -> None:
        """Validate, store, ack one message; count and drop what is wrong."""
        try:
            self._handle(message.topic, bytes(message.payload), retained=bool(message.retain))
        except Exception as exc:  # noqa: BLE001 - one bad message must never stop ingest
            self.count("internal_errors")
            logger.exception("message on %s not handled: %s", message.topic, exc)

    def _reject(self, reason: str, where: str, detail: str) -> None:
        self.count("rejected")
        self.count(f"rejected_{reason}")
        self.log.warn(reason, "rejected a message on %s (%s): %s", where, reason, detail)

    def _handle(self, name: str, payload: bytes, *, retained: bool) -> None:
        parsed = parse_topic(self.prefix, name)
        if parsed is None or parsed[1] not in (*DATA_TOPICS, STATUS):
            self._reject("topic", name[:200], "not a device data or status topic")
            return
        device_id, kind = parsed
        if kind == STATUS and not payload:
            return  # someone cleared the retained status: nothing to record
        try:
            model = decode(kind, device_id, payload)
            data = chunk_bytes(model) if kind == SAMPLES else b""
        except PayloadRejected as exc:
            self._reject(exc.reason, name[:200], str(exc))
            return
        received = time.time()
        if kind == STATUS:
            try:
                self.store.record_status(model, received=received, retained=retained)
                self.count("status_messages")
            except (StoreError, sqlite3.Error) as exc:
                self.count("store_errors")
                self.log.warn("store", "status of %s not stored: %s", device_id, exc)
            return
        try:
            outcome = self._store(kind, model, data, received)
        except (StoreError, sqlite3.Error) as exc:
            # No ack: the device sends the batch again after its ack timeout.
            self.count("store_errors")
            self.log.warn("store", "%s from %s not stored (%s); the device will resend it", kind, device_id, exc)
            return
        self.count(f"stored_{kind}", outcome.inserted)
        self.count(f"duplicate_{kind}", outcome.duplicates)
        if outcome.conflicts:
            # Kept aside in the store's conflicts table and shown by `cloud fleet`; acked.
            self.count(f"conflict_{kind}", outcome.conflicts)
            self.log.warn("conflict", "%s from %s: %s rows reuse a stored key with other content (kept aside in"
                          " conflicts; a cloned buffer or one device id on two boxes?)", kind, device_id, outcome.conflicts)
        if outcome.problem:
            self.count(outcome.problem)
            self.log.warn(outcome.problem, "%s from %s: %s", kind, device_id, outcome.problem)
        if outcome.acked:
            self._ack(device_id, model.batch, outcome)

    def _store(self, kind: str, model: Any, data: bytes, received: float) -> StoreOutcome:
        if kind == RESULTS:
            assert isinstance(model, ResultsBatch)
            return self.store.store_results(model, received=received)
        if kind == GAPS:
            assert isinstance(model, GapsBatch)
            return self.store.store_gaps(model, received=received)
        if kind == EVENTS:
            assert isinstance(model, EventsBatch)
            return self.store.store_events(model, received=received)
        assert isinstance(model, SampleChunk)
        return self.store.store_sample_chunk(model, data, received=received)

    def _ack(self, device_id: str, batch: str, outcome: StoreOutcome) -> None:
        # Only reached after the store call returned, i.e. after COMMIT.
        body = {"v": PAYLOAD_VERSION, "type": "ack", "device_id": device_id, "batch": batch, "ts": time.time(),
                "acked": {k: [list(r) for r in v] for k, v in outcome.acked.items()}}  # fmt: skip
        self.publish(topic(self.prefix, device_id, ACK), encode_payload(body), 1)
        self.count("acks_sent")


def subscriptions(config: CloudConfig) -> list[tuple[str, int]]:
    """Shared subscriptions for data, a plain one for status."""
    prefix, group = config.mqtt.topic_prefix, config.ingest.share_group
    subs = [(shared_filter(group, device_topic_filter(prefix, kind)), 1) for kind in DATA_TOPICS]
    subs.append((device_topic_filter(prefix, STATUS), 1))
    return subs


def worker_client_id(config: CloudConfig) -> str:
    """Unique per worker process: two workers with one client id would kick each other off."""
    if config.mqtt.client_id:
        return config.mqtt.client_id
    host = "".join(ch for ch in socket.gethostname() if ch.isalnum() or ch in "-_")[:32] or "host"
    return f"linewatch-ingest-{host}-{os.getpid()}"


def serve(config: CloudConfig, stop: threading.Event, *, on_ready: Callable[[str], None] | None = None) -> dict[str, int]:
    """Run one ingest worker until ``stop`` is set; ``on_ready(client_id)`` after its first connect.

    Returns this worker's own counters (messages stored, rejected, acks sent).
    """
    m = config.mqtt
    store = open_store(config)
    ingestor = Ingestor(config, store)
    settings = LinkSettings.of(m, client_id=worker_client_id(config))
    link = MqttLink(
        settings, stop=stop, subscriptions=subscriptions(config), on_message=ingestor.handle,
        backoff=Backoff(initial=0.2, maximum=5.0), max_inflight_messages=1000,
    )  # fmt: skip
    ingestor.publish = lambda name, payload, qos: link.publish(name, payload, qos=qos)
    logger.info("ingest %s: store %s, broker %s:%s, group %s", settings.client_id, config.store.path, m.host, m.port,
                config.ingest.share_group)  # fmt: skip
    try:
        announced = False
        while not stop.is_set():
            link.step(0.2)
            ingestor.tick()
            if link.connected and not announced:
                announced = True
                if on_ready is not None:
                    on_ready(settings.client_id)
    finally:
        # Acks already queued are written out before the socket closes.
        if link.connected:
            link.client.loop(timeout=0.1)
        ingestor.tick(force=True)
        link.close()
        store.close()
    return dict(ingestor.totals)


def run_ingest(config: CloudConfig) -> int:
    """``linewatch cloud serve``: run until SIGTERM/SIGINT; the exit code."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping ingest", signum)
        stop.set()

    def announce(client_id: str) -> None:
        m = config.mqtt
        print(f"linewatch ingest {client_id}: connected to {m.host}:{m.port}, group {config.ingest.share_group},"
              f" store {config.store.path}", file=sys.stderr, flush=True)  # fmt: skip

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The same process answers OTA chunk requests, so a push works while only `serve` runs.
    from cloud.ota_server import start_ota_server

    ota = start_ota_server(config)
    try:
        totals = serve(config, stop, on_ready=announce)
    finally:
        ota.stop()
        ota.join()
    print(f"linewatch ingest stopped: {json.dumps(totals, sort_keys=True)}", file=sys.stderr, flush=True)
    return 0
