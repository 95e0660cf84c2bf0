"""The agent's local SQLite buffer: every decision, durably, before it goes anywhere.

:class:`Buffer` records decisions, samples and events in one SQLite file, keeps it under
a byte budget, hands unsynced rows to sync and marks them synced on the cloud's ack.
How and why (durability, eviction order, full disk, checkpoints, threads, corruption):
docs/buffer.md. Modules: ``buffer`` (the class), ``records``, ``schema`` (tables and
migrations), ``eviction``, ``checkpoint``, ``recovery``, ``errors``.
"""

from edge.buffer.buffer import (
    DEFAULT_MAX_BYTES,
    MAX_SAMPLE_FRACTION,
    MIN_MAX_BYTES,
    SYNCHRONOUS_MODES,
    Buffer,
)
from edge.buffer.checkpoint import (
    BACKGROUND_NICE,
    BACKSTOP_FACTOR,
    CHECKPOINT_INTERVAL_S,
    Checkpointer,
    CheckpointMode,
    nice_this_thread,
)
from edge.buffer.eviction import LOW_WATER_FRACTION, MAX_EVICT_BYTES
from edge.buffer.records import (
    DRIFT_SAMPLE_KINDS,
    EVENT_KINDS,
    SAMPLE_REASONS,
    ResultRecord,
    SampleRecord,
    sample_reason_ok,
)
from edge.buffer.recovery import QUICK_CHECK_ABOVE_BYTES, IntegrityMode, Recovery
from edge.buffer.schema import (
    COUNTER_NAMES,
    LATEST_VERSION,
    MAX_EVENT_DETAIL_CHARS,
    MIGRATIONS,
    TABLES,
    migrate,
    migration,
    schema_version,
)
from edge.sqlite import Migration

__all__ = [
    "BACKGROUND_NICE",
    "BACKSTOP_FACTOR",
    "CHECKPOINT_INTERVAL_S",
    "COUNTER_NAMES",
    "DEFAULT_MAX_BYTES",
    "DRIFT_SAMPLE_KINDS",
    "EVENT_KINDS",
    "LATEST_VERSION",
    "LOW_WATER_FRACTION",
    "MAX_EVENT_DETAIL_CHARS",
    "MAX_EVICT_BYTES",
    "MAX_SAMPLE_FRACTION",
    "MIGRATIONS",
    "MIN_MAX_BYTES",
    "QUICK_CHECK_ABOVE_BYTES",
    "SAMPLE_REASONS",
    "SYNCHRONOUS_MODES",
    "TABLES",
    "Buffer",
    "CheckpointMode",
    "Checkpointer",
    "IntegrityMode",
    "Migration",
    "Recovery",
    "ResultRecord",
    "SampleRecord",
    "migrate",
    "migration",
    "nice_this_thread",
    "sample_reason_ok",
    "schema_version",
]
