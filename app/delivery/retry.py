"""When to try a delivery again: a pure function, so it can be tested exhaustively."""

from __future__ import annotations

import random
from datetime import timedelta

BASE_SECONDS = 2.0
CAP_SECONDS = 15 * 60.0


def backoff(attempts: int, *, rng: random.Random | None = None) -> timedelta:
    """Exponential backoff with "equal jitter": half fixed, half random.

    The fixed half keeps the schedule growing; the random half spreads a crowd of retries
    that failed together (a peer coming back after an outage) so they do not return together.
    """
    if attempts < 1:
        raise ValueError("attempts counts from 1")
    ceiling = min(CAP_SECONDS, BASE_SECONDS * 2 ** min(attempts - 1, 32))
    draw = (rng or random).random()  # jitter, not a secret
    return timedelta(seconds=ceiling / 2 + draw * ceiling / 2)
