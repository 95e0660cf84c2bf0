"""Retry delays for anything that reconnects: the camera, the MQTT links."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; the caller counts its consecutive failures.

    Before retry ``n`` (0-based) the ceiling is ``d = min(maximum, initial * factor**n)`` and
    the wait is drawn uniformly from ``[d * (1 - jitter), d]``: never above ``maximum``, and
    random, so a fleet that lost the same network or broker does not come back all at once.
    """

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.5
    rng: random.Random | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (
            self.initial <= 0
            or self.factor < 1
            or self.maximum < self.initial
            or not 0 <= self.jitter <= 1
        ):
            raise ValueError(
                "backoff needs initial > 0, factor >= 1, maximum >= initial and 0 <= jitter <= 1, "
                f"got {self}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt``."""
        ceiling = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return (self.rng or random).uniform(ceiling * (1 - self.jitter), ceiling)


__all__ = ["Backoff"]
