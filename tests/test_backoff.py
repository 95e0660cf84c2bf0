"""edge.backoff: the retry delays of the camera and the MQTT links."""

from __future__ import annotations

import random

import pytest

from edge.backoff import Backoff


def test_backoff_grows_to_the_cap_with_bounded_jitter() -> None:
    backoff = Backoff()  # the defaults: 0.5 s, x2, 30 s max, waits in [d/2, d]
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (100, 30.0)]:
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling * (1 - backoff.jitter) <= d <= ceiling for d in delays), (
            attempt,
            delays,
        )
        assert len(set(delays)) > 1, "jittered: a fleet does not retry in step"


def test_backoff_is_reproducible_with_its_own_rng() -> None:
    a = Backoff(initial=0.5, maximum=4.0, rng=random.Random(1))
    b = Backoff(initial=0.5, maximum=4.0, rng=random.Random(1))
    assert [a.delay(n) for n in range(6)] == [b.delay(n) for n in range(6)]
    assert Backoff(jitter=0).delay(3) == 4.0


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"initial": 0}, "initial > 0"),
        ({"initial": 5, "maximum": 1}, "maximum >= initial"),
        ({"factor": 0.5}, "factor >= 1"),
        ({"jitter": 1.5}, "0 <= jitter <= 1"),
    ],
)
def test_backoff_refuses_settings_that_cannot_work(kwargs: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Backoff(**kwargs)
