"""When to try a delivery again, and when to give up: pure functions, tested exhaustively.

Urgency sets both. An emergency request (a life at risk, evidence about to vanish) retries
within seconds and fails loudly within hours, so a human takes over; a routine one backs off
to a quarter of an hour and keeps trying for a week.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float
    cap_seconds: float
    expiry: timedelta


POLICIES = {
    "emergency": RetryPolicy(base_seconds=0.5, cap_seconds=60.0, expiry=timedelta(hours=2)),
    "urgent": RetryPolicy(base_seconds=1.0, cap_seconds=300.0, expiry=timedelta(hours=24)),
    "routine": RetryPolicy(base_seconds=2.0, cap_seconds=900.0, expiry=timedelta(days=7)),
}
BASE_SECONDS = POLICIES["routine"].base_seconds
CAP_SECONDS = POLICIES["routine"].cap_seconds


def policy_for(urgency: str) -> RetryPolicy:
    """Unknown urgencies get the routine policy: never a faster give-up than asked for."""
    return POLICIES.get(urgency, POLICIES["routine"])


def backoff(
    attempts: int, *, policy: RetryPolicy | None = None, rng: random.Random | None = None
) -> timedelta:
    """Exponential backoff with "equal jitter": half fixed, half random.

    The fixed half keeps the schedule growing; the random half spreads a crowd of retries
    that failed together (a peer coming back after an outage) so they do not return together.
    """
    if attempts < 1:
        raise ValueError("attempts counts from 1")
    chosen = policy or POLICIES["routine"]
    ceiling = min(chosen.cap_seconds, chosen.base_seconds * 2 ** min(attempts - 1, 32))
    draw = (rng or random).random()  # jitter, not a secret
    return timedelta(seconds=ceiling / 2 + draw * ceiling / 2)


def delivery_deadline(queued_at: datetime, urgency: str, envelope_expires_at: datetime) -> datetime:
    """Give up at the policy's expiry, and never after the envelope itself expires (the
    receiver would refuse it then anyway)."""
    return min(queued_at + policy_for(urgency).expiry, envelope_expires_at)


def next_attempt(
    now: datetime,
    attempts: int,
    urgency: str,
    deadline: datetime | None,
    *,
    not_before: datetime | None = None,
    rng: random.Random | None = None,
    give_up: bool = True,
) -> datetime | None:
    """When to try again after a failed attempt (never before `not_before`, the time the
    peer asked us to wait for, nor after the deadline), or None when the deadline has
    passed. `give_up=False`: `now` is not to be believed (the clock just stepped,
    app/delivery/clocksteps.py): past the deadline, the next attempt after the backoff."""
    when = now + backoff(attempts, policy=policy_for(urgency), rng=rng)
    if not_before is not None:
        when = max(when, not_before)
    if deadline is not None and now >= deadline:
        return None if give_up else when
    return min(when, deadline) if deadline is not None else when
