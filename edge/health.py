"""The health watch after a model switch: decide, from its first decisions, if a new model stays.

:class:`edge.ota.OtaClient` feeds a :class:`HealthWatch` every decision of the new model
and rolls back when the verdict is not ok.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from edge.inference import Prediction


@dataclass(frozen=True)
class HealthVerdict:
    """The end of a health watch: ``ok`` or the reason to roll back."""

    ok: bool
    version: str
    parts: int
    reason: str | None = None


class HealthWatch:
    """Watches the first ``parts`` decisions of a new model against the previous one's.

    Rollback when, among those parts:
      * any output is NaN/inf (at once);
      * invoke errors exceed max(2, parts/20) (at once);
      * at the end, every raw output was identical while the previous model's were not;
      * at the end, the fail rate is over 2 x the previous model's + 0.10 (needs 20
        decisions of the previous model to compare with).
    """

    def __init__(self, version: str, parts: int, baseline: Sequence[tuple[bool, tuple[int, ...]]]) -> None:
        self.version = version
        self.parts = parts
        self.baseline = list(baseline)
        self.seen = 0
        self.failed = 0
        self.errors = 0
        self.raws: set[tuple[int, ...]] = set()
        self.verdict: HealthVerdict | None = None

    def _trip(self, reason: str) -> HealthVerdict:
        self.verdict = HealthVerdict(False, self.version, self.seen, reason)
        return self.verdict

    def add(self, prediction: Prediction) -> HealthVerdict | None:
        """Count one decision of the new model; returns the verdict once there is one."""
        if self.verdict is not None:
            return None
        self.seen += 1
        values = (prediction.score, *prediction.probabilities)
        if not all(math.isfinite(x) for x in values):
            return self._trip(f"non-finite output (NaN or inf) at part {self.seen}")
        self.failed += 0 if prediction.passed else 1
        if len(self.raws) < 2:
            self.raws.add(tuple(prediction.raw))
        return self._maybe_finish()

    def add_error(self, error: str) -> HealthVerdict | None:
        """Count one invoke error of the new model."""
        if self.verdict is not None:
            return None
        self.seen += 1
        self.errors += 1
        if self.errors > max(2, self.parts // 20):
            return self._trip(f"{self.errors} invoke errors in {self.seen} parts (last: {error[:200]})")
        return self._maybe_finish()

    def _maybe_finish(self) -> HealthVerdict | None:
        if self.seen < self.parts:
            return None
        decided = self.seen - self.errors
        base = self.baseline
        if decided >= 2 and len(self.raws) == 1 and len(base) >= 10 and len({r for _, r in base}) > 1:
            return self._trip(f"constant output {list(next(iter(self.raws)))} over {decided} parts")
        if len(base) >= 20 and decided > 0:
            prev_rate = sum(1 for passed, _ in base if not passed) / len(base)
            rate = self.failed / decided
            if rate > 2 * prev_rate + 0.10:
                return self._trip(f"fail rate {rate:.0%} over {decided} parts, previous model {prev_rate:.0%}")
        self.verdict = HealthVerdict(True, self.version, self.seen)
        return self.verdict


__all__ = ["HealthVerdict", "HealthWatch"]
