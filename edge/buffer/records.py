"""What the agent hands the buffer: decisions and the JPEG samples kept for labelling."""

from __future__ import annotations

from dataclasses import dataclass, field

SAMPLE_REASONS = ("fail", "low_confidence", "reservoir")
# Drift samples (edge/drift.py): ``drift_<kind>:<measure>+<measure>``, at most 64 characters.
DRIFT_SAMPLE_KINDS = ("fail", "near_threshold", "random")
EVENT_KINDS = (
    "start",
    "stop",
    "camera_up",
    "camera_down",
    "model_loaded",
    "eviction",
    "buffer_recovered",
)


@dataclass(frozen=True)
class ResultRecord:
    """One pass/fail decision as the agent hands it to the buffer."""

    ts: float  # unix time of the capture
    device_id: str
    part_id: int | None
    model_version: str
    label: str
    score: float  # defect score, higher means more likely defective
    passed: bool
    capture_ms: float | None = None
    preprocess_ms: float | None = None
    invoke_ms: float | None = None
    # Tiled models: the tile whose score decided, (x, y, width, height) in camera-frame pixels.
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class SampleRecord:
    """One JPEG frame kept for labelling, with why it was kept."""

    ts: float
    reason: str  # one of SAMPLE_REASONS, or drift_<kind>:<measures> (sample_reason_ok)
    label: str
    score: float
    width: int
    height: int
    jpeg: bytes = field(repr=False)
    result_seq: int | None = None


def sample_reason_ok(reason: str) -> bool:
    """A reason the sampler gives: a normal one, or a drift one naming its kind (and measures)."""
    if reason in SAMPLE_REASONS:
        return True
    kind = reason[len("drift_"):].split(":", 1)[0] if reason.startswith("drift_") else None
    return kind in DRIFT_SAMPLE_KINDS and len(reason) <= 64
