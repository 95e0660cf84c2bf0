"""The outbox over MQTT: drain the SQLite buffer to the cloud, mark rows synced only on ack.

One thread (``sync``) owns everything here: its own :class:`~edge.buffer.Buffer`
connection, the paho client (driven with ``loop()``, no paho thread) and the in-flight
table. The inspection thread never waits on it: it only commits rows; this thread polls
the buffer for unsynced rows (every ``IDLE_POLL_S`` when idle, at once when the last
batch was full).

Sharing the box with inspection (issue 4: decision latency p99 may rise by at most 10 %
while a backlog drains; docs/sync.md "Sharing the box with inspection" has the figures).
While the line runs (new results appeared in the buffer within ``LINE_HOLD_S``):

- Marks go in transactions of at most ``MARK_CHUNK_ROWS`` rows, so the write lock the
  agent's commit may wait for is held under a millisecond. This connection is
  ``synchronous=NORMAL``: a mark lost in a power cut is a resend, and the agent's next
  FULL commit fsyncs the WAL anyway.
- The drain is paced: one unit of work per slice (a batch, or a mark chunk once one is
  due), then a pause of ``(1 - BUSY_DUTY) / BUSY_DUTY`` times the slice; within a slice,
  reads of ``BUSY_READ_ROWS`` and column-wise encoding with a short sleep between pieces
  hand the GIL to the agent's threads at once instead of after the 5 ms switch interval.
- A stopped line gets the flat-out drain (read ahead, every in-flight slot filled, marks
  grouped every ``MARK_INTERVAL_S``).

An idle poll never walks the synced history: when nothing is pending after the cursor,
the cursor moves up to the last seq that existed before the read.

Protocol (docs/sync.md has the whole of it; the payload models are in edge.protocol):

- Rows leave as batches in seq order: results, gaps and events as column arrays of at
  most ``mqtt.batch_rows`` rows and ``MAX_PAYLOAD_BYTES`` bytes; samples as base64 chunks
  of ``SAMPLE_CHUNK_BYTES``. QoS 1, each with a batch id, first/last seq and the seqs.
- At most ``mqtt.max_inflight`` batches wait for an ack at a time. The cloud publishes
  an ack on ``.../devices/<id>/ack`` only after it COMMITTED the rows; only then are they
  marked synced here. A batch without an ack after ``mqtt.ack_timeout_s`` (or across a
  reconnect) is sent again; the cloud stores each (device_id, seq) once and acks again.
  So nothing is lost (no ack, no delete) and nothing is duplicated (idempotent insert).
- Status: retained ``online`` on connect and every ``mqtt.status_interval_s``; retained
  ``offline`` on a clean stop; the broker publishes the last will (``offline``, reason
  ``lost``) if the link dies.
- Reconnects back off exponentially with jitter; a refused CONNACK is a failed connect,
  never "connected".

The link itself (connect, backoff, loop) is :class:`edge.mqtt.MqttLink`, shared with the
cloud's ingest workers.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from edge.backoff import Backoff
from edge.config import AgentConfig
from edge.exceptions import BufferStoreError
from edge.mqtt import LinkSettings, MqttLink
from edge.protocol import (
    ACK,
    BOX_COLUMN,
    COLUMNS,
    DATA_KINDS,
    MAX_PAYLOAD_BYTES,
    MAX_SAMPLE_BYTES,
    PAYLOAD_VERSION,
    RESULTS,
    RESULTS_BOX_VERSION,
    SAMPLE_CHUNK_BYTES,
    SAMPLES,
    STATUS,
    Ack,
    box_problem,
    encode_payload,
    topic,
)

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # how often an idle outbox looks for new rows
READ_AHEAD_BATCHES = 4  # rows read from the buffer per query, in batches (line stopped)
MARK_INTERVAL_S = 0.25  # acks are marked synced in groups at most this far apart while busy
MARK_CHUNK_ROWS = 300  # rows marked synced per transaction while the line runs (~1 ms of write lock)
# While the line runs, a mark waits for the agent's next commit and follows it at once: the
# write lock is then free for a whole frame interval, so the agent's commit finds it free.
MARK_ALIGN_POLL_S = 0.0005
MARK_ALIGN_MAX_S = 0.06
LINE_CHECK_S = 0.25  # how often the sync thread looks whether the agent is committing results
LINE_HOLD_S = 2.0  # the line counts as running this long after its last new result
BUSY_DUTY = 0.25  # while the line runs, the drain works at most this share of the time
MAX_PAUSE_S = 0.1  # longest pause between two slices of drain work
BUSY_READ_ROWS = 100  # rows per buffer read while the line runs (~0.4 ms of GIL)
BREATHE_S = 0.0003  # sleep between sub-slices of drain work while the line runs
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
STOP_FLUSH_S = 0.5  # on stop: time allowed for the offline status's PUBACK


@dataclass
class _Inflight:
    """One sent batch (or one sample, all its chunks) waiting for the cloud's ack."""

    kind: str
    batch: str
    seqs: list[int]
    payloads: list[bytes]
    sent_at: float
    attempts: int = 1
    rows: int = 0


@dataclass
class SyncStats:
    """Counters of the sync thread, reported in the status message."""

    batches_sent: int = 0
    messages_sent: int = 0
    resends: int = 0
    acks: int = 0
    rows_acked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DATA_KINDS, 0))
    last_ack_at: float | None = None
    bad_acks: int = 0  # malformed, or for another device
    ignored_acks: int = 0  # well-formed acks that answer no batch in flight (stale or forged)
    ignored_ack_rows: int = 0  # rows named by acks that this device had not sent in that batch
    mark_commits: int = 0  # transactions that marked rows synced
    paced_s: float = 0.0  # pauses left to the running line during drains


class SyncClient:
    """Drain the agent's buffer to the cloud over MQTT; see the module docstring.

    ``start()`` runs it in a daemon thread; ``stop()`` then ``join(timeout)`` ends it
    within about a second (it publishes a retained ``offline`` status if connected).
    ``status`` is a callable returning the agent's live state (model, camera, ...),
    merged into each status message.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        reconnect_min_s: float = RECONNECT_MIN_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.prefix = config.mqtt.topic_prefix
        self._status_fn = status
        self.stop_event = threading.Event()
        self.stats = SyncStats()
        self.error: BaseException | None = None
        self._backoff = Backoff(initial=reconnect_min_s, maximum=reconnect_max_s)
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, _Inflight] = {}
        self._cursor: dict[str, int] = dict.fromkeys(DATA_KINDS, 0)
        self._acks: list[Ack] = []
        self._to_mark: dict[str, list[tuple[int, int]]] = {}
        self._last_mark = 0.0
        self._ahead: dict[str, list[dict[str, Any]]] = {k: [] for k in DATA_KINDS}  # read, not yet sent
        self._ids = itertools.count(1)
        self._session = os.urandom(3).hex()
        self._next_status = 0.0
        self._line_head: int | None = None  # results.last_seq at the last look
        self._line_until = 0.0  # monotonic time until which the line counts as running
        self._next_line_check = 0.0
        self._resume_at = 0.0  # paced drain: no work before this monotonic time
        self._next_kind = 0  # paced drain: the table the next slice starts with
        self._aligned_s = 0.0  # this slice's wait for the agent's commit (see _follow_line_commit)
        self.link: MqttLink | None = None
        self.buffer_id: str | None = None  # the buffer's incarnation, read when the thread opens it

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sync thread (returns at once; the network is never waited for)."""
        if self._thread is not None:
            raise RuntimeError("SyncClient already started")
        self._thread = threading.Thread(target=self._main, name="sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to finish: flush the offline status, disconnect, close the buffer."""
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (at most ``timeout`` seconds)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.connected

    def snapshot(self) -> dict[str, Any]:
        """Sync state for the agent's status (safe to call from any thread)."""
        link = self.link
        return {
            "connected": self.connected,
            "connected_since": None if link is None else link.connected_since,
            "connects": 0 if link is None else link.connects,
            "last_error": None if link is None else link.last_error,
            "inflight": len(self._inflight),
            "batches_sent": self.stats.batches_sent,
            "resends": self.stats.resends,
            "acks": self.stats.acks,
            "bad_acks": self.stats.bad_acks,
            "ignored_acks": self.stats.ignored_acks,
            "ignored_ack_rows": self.stats.ignored_ack_rows,
            "rows_acked": dict(self.stats.rows_acked),
            "last_ack_at": self.stats.last_ack_at,
            "mark_commits": self.stats.mark_commits,
            "line_running": time.monotonic() < self._line_until,
            "paced_s": round(self.stats.paced_s, 3),
        }

    # -- the thread ------------------------------------------------------------------------

    def _main(self) -> None:
        from edge.buffer import Buffer

        cfg = self.config
        while not self.stop_event.is_set():
            try:
                # Its own connection: the inspection thread never shares (or waits on) it.
                # NORMAL: this connection only writes marks; a mark lost in a power cut is a
                # resend, and no fsync means the write lock is held for the UPDATE alone.
                with Buffer(cfg.buffer.path, max_bytes=cfg.buffer.max_bytes, synchronous="NORMAL",
                            device_id=cfg.device_id, integrity_check="off") as buf:  # fmt: skip
                    self._run(buf)
                return
            except BufferStoreError as exc:
                self.error = exc
                logger.error("sync cannot use the buffer: %s; retrying in 5 s", exc)
                if self.link is not None:
                    self.link.close()
                    self.link = None
                if self.stop_event.wait(5.0):
                    return
            except Exception as exc:  # noqa: BLE001 - never take the agent down; log and retry
                self.error = exc
                logger.exception("sync thread failed; restarting it in 5 s")
                if self.link is not None:
                    self.link.close()
                    self.link = None
                if self.stop_event.wait(5.0):
                    return

    def _run(self, buf: Any) -> None:
        will = encode_payload({"v": PAYLOAD_VERSION, "state": "offline", "device_id": self.device_id, "reason": "lost"})
        self.buffer_id = buf.buffer_id
        self._inflight.clear()
        self._to_mark.clear()
        self._ahead = {k: [] for k in DATA_KINDS}
        self._cursor = dict.fromkeys(DATA_KINDS, 0)
        self._line_head = None
        self._resume_at = 0.0
        link = MqttLink(
            LinkSettings.of(self.config.mqtt, client_id=self.device_id),
            stop=self.stop_event,
            subscriptions=[(topic(self.prefix, self.device_id, ACK), 1)],
            on_message=self._on_message,
            on_connected=self._on_connected,
            will=(topic(self.prefix, self.device_id, STATUS), will, 1, True),
            backoff=self._backoff,
            max_inflight_messages=max(20, self.config.mqtt.max_inflight * 2 + 4),
        )
        self.link = link
        wait = IDLE_POLL_S
        try:
            while not self.stop_event.is_set():
                link.step(wait)
                wait = IDLE_POLL_S
                self._take_acks()
                now = time.monotonic()
                if now < self._resume_at:  # paced drain: acks are taken in, the work waits
                    wait = self._resume_at - now
                    continue
                started = time.perf_counter()
                self._aligned_s = 0.0
                busy = self._line_running(buf, now)
                if link.connected:
                    if now >= self._next_status:
                        self._publish_status(buf)
                        self._next_status = now + self.config.mqtt.status_interval_s
                    self._resend_due(now)
                    # Line running: one unit of work per slice, marks first once a chunk
                    # is due, so the marks keep up with the sends.
                    marks_due = busy and sum(b - a + 1 for runs in self._to_mark.values() for a, b in runs) >= MARK_CHUNK_ROWS
                    if not marks_due and self._fill(buf, busy=busy):
                        wait = 0.0  # a full batch went out: more rows are waiting
                if self._mark_acked(buf, busy=busy):
                    wait = 0.0  # more acked rows to mark
                if busy:
                    # The line is inspecting: leave it the CPU, the GIL and the disk for a while.
                    worked = time.perf_counter() - started - self._aligned_s
                    pause = min(MAX_PAUSE_S, max(0.0, worked) * (1 - BUSY_DUTY) / BUSY_DUTY)
                    self._resume_at = time.monotonic() + pause
                    self.stats.paced_s += pause
            self._shutdown(buf)
        finally:
            link.close()

    def _shutdown(self, buf: Any) -> None:
        link = self.link
        if link is not None and link.connected:
            # Take in the acks already on their way, then say goodbye with a retained offline.
            link.client.loop(timeout=0.05)
            self._take_acks()
            self._mark_acked(buf, force=True)
            payload = self._status_payload(buf, state="offline")
            info = link.publish(topic(self.prefix, self.device_id, STATUS), payload, qos=1, retain=True)
            if not link.flush(info, STOP_FLUSH_S):
                logger.warning("offline status not confirmed by the broker before stop")
        self._take_acks()
        self._mark_acked(buf, force=True)

    # -- connection events -----------------------------------------------------------------

    def _on_connected(self) -> None:
        # Acks published while we were away are gone (clean session): everything still in
        # flight goes again now; the cloud dedups and acks again.
        for item in self._inflight.values():
            item.sent_at = float("-inf")
        self._next_status = 0.0

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        try:
            ack = Ack.model_validate_json(message.payload)
        except ValidationError as exc:
            self.stats.bad_acks += 1
            logger.warning("ignored a malformed ack on %s: %s", message.topic, str(exc).splitlines()[0])
            return
        if ack.device_id != self.device_id:
            self.stats.bad_acks += 1
            logger.warning("ignored an ack for device %s on %s", ack.device_id, message.topic)
            return
        self._acks.append(ack)

    # -- acks ------------------------------------------------------------------------------

    def _take_acks(self) -> None:
        """Retire the in-flight batches the received acks answer; queue their rows to mark.

        Only rows this device sent and still waits for are ever marked: an ack must name an
        in-flight batch (its batch id, or a chunk of an in-flight sample), and of its
        ranges only the seqs of that batch count. Anything else (an ack for a batch already
        settled, an unknown batch id, a range the device never sent, a forged ack) is
        counted in ``ignored_acks`` / ``ignored_ack_rows``, logged, and changes nothing.
        """
        if not self._acks:
            return
        acks, self._acks = self._acks, []
        for ack in acks:
            self.stats.acks += 1
            item = self._inflight_for(ack.batch)
            if item is None:
                self.stats.ignored_acks += 1
                rows = sum(b - a + 1 for ranges in ack.acked.values() for a, b in ranges)
                self.stats.ignored_ack_rows += rows
                # A late second ack of a resent batch lands here too: harmless, debug only.
                logger.debug("ignored an ack for batch %s: not in flight (%s rows named)", ack.batch, rows)
                continue
            ranges = _merge(list(ack.acked.get(item.kind, [])))  # type: ignore[call-overload]
            sent = [s for s in item.seqs if _inside(s, ranges)]
            stray = sum(b - a + 1 for table, rs in ack.acked.items() for a, b in rs) - len(sent)
            if stray > 0:
                self.stats.ignored_ack_rows += stray
                logger.warning("ack for batch %s names %s rows this batch did not send; only its own %s are marked",
                               ack.batch, stray, len(sent))  # fmt: skip
            if sent:
                self._to_mark.setdefault(item.kind, []).extend(_ranges_of(sent))
                self.stats.last_ack_at = time.time()
            if len(sent) == len(item.seqs):
                self._done(item.batch)

    def _inflight_for(self, batch_id: str) -> _Inflight | None:
        """The in-flight batch an ack answers: its own id, or a chunk id of an in-flight sample."""
        item = self._inflight.get(batch_id)
        if item is None and "." in batch_id:
            item = self._inflight.get(batch_id.rsplit(".", 1)[0])
            if item is not None and item.kind != SAMPLES:
                return None
        return item

    def _mark_acked(self, buf: Any, *, force: bool = False, busy: bool = False) -> bool:
        """Mark what the cloud acked as synced; True when acked rows are left for the next slice.

        Runs after the next batches went out, so this write overlaps the cloud's work. With
        the line stopped, a drain's acks are grouped MARK_INTERVAL_S apart into one
        transaction per table. With the line running (``busy``), at most MARK_CHUNK_ROWS
        rows are marked per call, so the agent's commit never waits long for the write lock.
        A crash before the mark only means those rows are sent again and acked again.
        """
        if not self._to_mark:
            return False
        now = time.monotonic()
        if not force and not busy and self._inflight and now - self._last_mark < MARK_INTERVAL_S:
            return False
        self._last_mark = now
        chunked = busy and not force
        wrote = False
        pending, self._to_mark = self._to_mark, {}
        for name, runs in pending.items():
            merged = _merge(runs)
            if not merged:
                continue
            if chunked and wrote:
                self._to_mark[name] = merged  # one transaction per slice: this table is next
                continue
            if chunked:
                merged, rest = _split(merged, MARK_CHUNK_ROWS)
                if rest:
                    self._to_mark[name] = rest
                self._follow_line_commit(buf)
            if len(merged) == 1:  # the common case: consecutive batches, one range UPDATE
                buf.mark_synced(name, range(merged[0][0], merged[0][1] + 1))
            else:
                buf.mark_synced(name, [s for a, b in merged for s in range(a, b + 1)])
            self.stats.mark_commits += 1
            wrote = True
        return bool(self._to_mark)

    def _follow_line_commit(self, buf: Any) -> None:
        """Wait (at most MARK_ALIGN_MAX_S) until the agent has just committed.

        A mark that lands while the agent's writer wants the lock costs that commit SQLite's
        busy-handler sleep (1 ms at best); right after a commit the next one is a frame
        interval away. The wait is not drain work: the pacing does not count it.
        """
        t0 = time.perf_counter()
        try:
            before = buf.data_version()
            deadline = t0 + MARK_ALIGN_MAX_S
            while not self.stop_event.is_set() and time.perf_counter() < deadline:
                time.sleep(MARK_ALIGN_POLL_S)
                if buf.data_version() != before:
                    break
        finally:
            self._aligned_s += time.perf_counter() - t0

    def _done(self, batch_id: str) -> None:
        item = self._inflight.pop(batch_id)
        self.stats.rows_acked[item.kind] = self.stats.rows_acked.get(item.kind, 0) + len(item.seqs)

    # -- sending ---------------------------------------------------------------------------

    def _resend_due(self, now: float) -> None:
        timeout = self.config.mqtt.ack_timeout_s
        assert self.link is not None
        for item in self._inflight.values():
            if now - item.sent_at >= timeout:
                if item.sent_at != float("-inf"):
                    logger.info("no ack for %s batch %s after %.1f s (attempt %s); sending it again",
                                item.kind, item.batch, timeout, item.attempts)  # fmt: skip
                for payload in item.payloads:
                    self.link.publish(topic(self.prefix, self.device_id, item.kind), payload, qos=1)
                    self.stats.messages_sent += 1
                item.sent_at = now
                item.attempts += 1
                self.stats.resends += 1

    def _fill(self, buf: Any, *, busy: bool = False) -> bool:
        """Send new batches round-robin over the tables while in-flight slots are free.

        True when a batch was cut short by the row or byte limit (more rows are waiting).
        With the line running (``busy``) one batch at most; the loop paces the next one,
        which starts from the next table so that none waits behind a long backlog.
        """
        limit = self.config.mqtt.max_inflight
        more = False
        active = list(DATA_KINDS[self._next_kind :] + DATA_KINDS[: self._next_kind])
        while active and len(self._inflight) < limit:
            for kind in list(active):
                if len(self._inflight) >= limit:
                    break
                sent, full = self._send_next(buf, kind, busy=busy)
                more = more or full
                if not sent:
                    active.remove(kind)
                elif busy:
                    self._next_kind = (DATA_KINDS.index(kind) + 1) % len(DATA_KINDS)
                    return len(self._inflight) < limit
        return more and len(self._inflight) < limit

    def _new_batch_id(self, kind: str, first: int, last: int) -> str:
        return f"{kind[0]}{first}-{last}.{self._session}{next(self._ids)}"

    def _send_next(self, buf: Any, kind: str, *, busy: bool = False) -> tuple[bool, bool]:
        """Send the next batch of ``kind`` after its cursor: (sent, batch was full)."""
        if kind == SAMPLES:
            return self._send_sample(buf)
        max_rows = self.config.mqtt.batch_rows
        ahead = self._ahead[kind]
        if len(ahead) < max_rows:
            # Line stopped: read ahead several batches in one query (fewer, larger reads).
            # Line running: one batch, in reads of BUSY_READ_ROWS with a breather between.
            want = len(ahead) + max_rows * (1 if busy else READ_AHEAD_BATCHES)
            while len(ahead) < want:
                step = min(want - len(ahead), BUSY_READ_ROWS if busy else want)
                if ahead:
                    got = buf.pending(kind, after_seq=int(ahead[-1]["seq"]), limit=step)
                else:
                    got = self._pending_after_cursor(buf, kind, step)
                ahead.extend(got)
                if len(got) < step:
                    break  # nothing more is waiting
                if busy:
                    _breathe()
        if not ahead:
            return False, False
        rows = ahead[:max_rows]
        full = len(ahead) >= max_rows
        breathe = _breathe if busy else None
        batch_id, payload = self._encode_rows(kind, rows, breathe=breathe)
        while len(payload) > MAX_PAYLOAD_BYTES and len(rows) > 1:
            # Estimate from the average row size, with a margin; shrink until it fits.
            keep = max(1, min(len(rows) - 1, int(len(rows) * MAX_PAYLOAD_BYTES / len(payload) * 0.95)))
            rows = rows[:keep]
            full = True
            batch_id, payload = self._encode_rows(kind, rows, breathe=breathe)
        if len(payload) > MAX_PAYLOAD_BYTES:
            # One row alone is too big (cannot happen with the buffer's own limits): say so and
            # move on; the row stays unsynced and visible in the device's backlog.
            logger.error("%s row seq %s is %s bytes encoded, over the %s byte MQTT limit; it cannot be sent",
                         kind, rows[0]["seq"], len(payload), MAX_PAYLOAD_BYTES)  # fmt: skip
            self._cursor[kind] = rows[0]["seq"]
            del ahead[:1]
            return True, True
        del ahead[: len(rows)]
        seqs = [int(r["seq"]) for r in rows]
        self._publish_new(_Inflight(kind, batch_id, seqs, [payload], time.monotonic(), rows=len(rows)))
        self._cursor[kind] = seqs[-1]
        return True, full

    def _encode_rows(
        self, kind: str, rows: list[dict[str, Any]], *, breathe: Callable[[], None] | None = None
    ) -> tuple[str, bytes]:
        """(batch id, compact JSON) of rows as column arrays: the bytes of ``encode_payload``.

        Encoded a column at a time, calling ``breathe`` between columns: one json.dumps of
        a 500-row batch holds the GIL for 2-3 ms, a column for a fraction of that.
        """
        seqs = [int(r["seq"]) for r in rows]
        batch_id = self._new_batch_id(kind, seqs[0], seqs[-1])
        names = COLUMNS[kind]
        version = PAYLOAD_VERSION
        if kind == RESULTS and any(r.get(BOX_COLUMN) is not None for r in rows):
            # Only batches that hold a box need version 2 (docs/sync.md, "Payloads").
            names, version = (*names, BOX_COLUMN), RESULTS_BOX_VERSION
        head: dict[str, Any] = {"v": version, "type": kind, "device_id": self.device_id, "batch": batch_id}
        if self.buffer_id:
            head["buffer_id"] = self.buffer_id
        head.update(first_seq=seqs[0], last_seq=seqs[-1])
        parts = [_dumps(head)[:-1], ',"seq":', _dumps(seqs), ',"cols":{']
        for i, name in enumerate(names):
            col: list[Any] = list(map(itemgetter(name), rows))
            if name == "passed":
                col = [bool(v) for v in col]
            elif name == "detail":  # a damaged detail comes back as text: wrap it, keep the row
                col = [v if isinstance(v, dict) else {"value": v} for v in col]
            elif name == BOX_COLUMN:  # one box the cloud would refuse must not hold back the batch
                col = [None if v is None or box_problem(v) else v for v in col]
            parts += ["," if i else "", _dumps(name), ":", _dumps(col)]
            if breathe is not None and i % 3 == 2:
                breathe()
        parts.append("}}")
        return batch_id, "".join(parts).encode("utf-8")

    def _pending_after_cursor(self, buf: Any, kind: str, limit: int) -> list[dict[str, Any]]:
        """Unsynced rows after the cursor; with none, the cursor skips the synced history.

        ``pending`` walks the primary key from the cursor past synced rows, so an idle poll
        from an old cursor would scan the whole synced history (100,000 rows: ~20 ms, five
        times a second). Every row up to the table's last seq read *before* the query was
        committed when the query ran, so none of them is unsynced past the cursor.
        """
        head = buf.last_seq(kind)
        rows: list[dict[str, Any]] = buf.pending(kind, after_seq=self._cursor[kind], limit=limit)
        if not rows and head > self._cursor[kind]:
            self._cursor[kind] = head
        return rows

    def _line_running(self, buf: Any, now: float) -> bool:
        """Whether the agent committed new results within LINE_HOLD_S (checked every LINE_CHECK_S)."""
        if now >= self._next_line_check:
            self._next_line_check = now + LINE_CHECK_S
            head = buf.last_seq(RESULTS)
            if self._line_head is not None and head > self._line_head:
                self._line_until = now + LINE_HOLD_S
            self._line_head = head
        return now < self._line_until

    def _send_sample(self, buf: Any) -> tuple[bool, bool]:
        rows = self._pending_after_cursor(buf, SAMPLES, 1)
        if not rows:
            return False, False
        row = rows[0]
        seq = int(row["seq"])
        self._cursor[SAMPLES] = seq
        jpeg = row.get("jpeg") or b""
        if not jpeg:
            logger.warning("sample seq %s has no image bytes; it cannot be sent", seq)
            return True, True
        jpeg = bytes(jpeg)
        if len(jpeg) > MAX_SAMPLE_BYTES:
            logger.error("sample seq %s is %s bytes, over the %s byte limit of the protocol; it cannot be sent"
                         " (lower sampling.max_side or jpeg_quality)", seq, len(jpeg), MAX_SAMPLE_BYTES)  # fmt: skip
            return True, True
        chunks = [jpeg[i : i + SAMPLE_CHUNK_BYTES] for i in range(0, len(jpeg), SAMPLE_CHUNK_BYTES)]
        batch_id = self._new_batch_id(SAMPLES, seq, seq)
        digest = hashlib.sha256(jpeg).hexdigest()
        payloads = [
            encode_payload(
                {
                    "v": PAYLOAD_VERSION,
                    "type": "sample",
                    "device_id": self.device_id,
                    "batch": f"{batch_id}.{i}",
                    **({"buffer_id": self.buffer_id} if self.buffer_id else {}),
                    "seq": seq,
                    "result_seq": row.get("result_seq"),
                    "ts": row.get("ts"),
                    "reason": row.get("reason"),
                    "label": row.get("label"),
                    "score": row.get("score"),
                    "width": row.get("width"),
                    "height": row.get("height"),
                    "bytes": len(jpeg),
                    "sha256": digest,
                    "chunk": i,
                    "chunks": len(chunks),
                    "data": base64.b64encode(part).decode("ascii"),
                }
            )  # fmt: skip
            for i, part in enumerate(chunks)
        ]
        self._publish_new(_Inflight(SAMPLES, batch_id, [seq], payloads, time.monotonic(), rows=1))
        return True, True

    def _publish_new(self, item: _Inflight) -> None:
        assert self.link is not None
        for payload in item.payloads:
            self.link.publish(topic(self.prefix, self.device_id, item.kind), payload, qos=1)
            self.stats.messages_sent += 1
        self._inflight[item.batch] = item
        self.stats.batches_sent += 1

    # -- status ----------------------------------------------------------------------------

    def _status_payload(self, buf: Any, *, state: str) -> bytes:
        agent: dict[str, Any] = {}
        if self._status_fn is not None:
            try:
                agent = dict(self._status_fn())
            except Exception as exc:  # noqa: BLE001 - a status bug must not stop the sync
                logger.warning("status callback failed: %s", exc)
        try:
            pending = buf.unsynced_counts()
            counters = buf.counters()
        except BufferStoreError as exc:
            logger.warning("status: buffer not readable: %s", exc)
            pending, counters = {}, {}
        body: dict[str, Any] = {**agent}
        if not body.get("evictions"):
            body["evictions"] = counters
        body.setdefault("groups", list(self.config.groups))
        body.update(
            {
                "v": PAYLOAD_VERSION,
                "state": state,
                "device_id": self.device_id,
                "ts": time.time(),
                "reason": "stopped" if state == "offline" else None,
                "model_version": agent.get("model_version") if isinstance(agent.get("model_version"), str) else None,
                "unsynced": int(pending.get(RESULTS, 0)),
                "pending": pending,
                "buffer_id": self.buffer_id,
                "sync": self.snapshot(),
            }
        )
        if not isinstance(body.get("groups"), list):
            body["groups"] = list(self.config.groups)
        payload = encode_payload(json.loads(json.dumps(body, default=str)))
        if len(payload) > MAX_PAYLOAD_BYTES:
            keep = ("v", "state", "device_id", "ts", "reason", "model_version", "unsynced", "pending", "groups", "sync",
                    "buffer_id")
            payload = encode_payload(json.loads(json.dumps({k: body[k] for k in keep}, default=str)))
        return payload

    def _publish_status(self, buf: Any) -> None:
        assert self.link is not None
        self._mark_acked(buf, force=True)  # so the backlog it reports is current
        self.link.publish(topic(self.prefix, self.device_id, STATUS), self._status_payload(buf, state="online"), qos=1, retain=True)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted inclusive ranges with overlapping and adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _dumps(value: Any) -> str:
    """One piece of a payload, encoded exactly as ``encode_payload`` encodes the whole."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _breathe() -> None:
    """Let the agent's threads take the GIL now (a paced drain's sub-slices end here).

    A thread that releases the GIL for a moment (SQLite, a socket) usually takes it back
    before a waiting thread wakes up, which then waits for the 5 ms switch interval; a
    real sleep hands it over at once.
    """
    time.sleep(BREATHE_S)


def _split(ranges: list[tuple[int, int]], rows: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Sorted disjoint inclusive ranges cut after the first ``rows`` seqs: (head, rest)."""
    head: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(ranges):
        n = b - a + 1
        if n >= rows:
            head.append((a, a + rows - 1))
            rest = ranges[i + 1 :] if n == rows else [(a + rows, b), *ranges[i + 1 :]]
            return head, rest
        head.append((a, b))
        rows -= n
    return head, []


def _inside(seq: int, ranges: list[tuple[int, int]]) -> bool:
    """``seq`` lies in one of the sorted, disjoint inclusive ranges."""
    i = bisect.bisect_right(ranges, (seq, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= seq <= ranges[i][1]


def _ranges_of(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct seqs as inclusive ranges of consecutive values."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
