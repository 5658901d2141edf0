"""The retry schedule is a pure function: exponential, capped, jittered within bounds."""

from __future__ import annotations

import random

import pytest

from app.delivery.retry import BASE_SECONDS, CAP_SECONDS, backoff


@pytest.mark.parametrize("attempts", range(1, 40))
def test_backoff_stays_within_its_window(attempts: int) -> None:
    ceiling = min(CAP_SECONDS, BASE_SECONDS * 2 ** (attempts - 1))
    for seed in range(20):
        delay = backoff(attempts, rng=random.Random(seed)).total_seconds()
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_grows_then_caps() -> None:
    lows = [backoff(n, rng=random.Random(0)).total_seconds() for n in range(1, 20)]
    assert lows[1] > lows[0]
    assert max(lows) <= CAP_SECONDS


def test_backoff_refuses_zero_attempts() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        backoff(0)
