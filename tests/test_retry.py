"""Retry schedules and deadlines are pure functions: exponential, capped, jittered within
bounds, faster and shorter-lived for urgent and emergency requests."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from app.config import Settings
from app.delivery import outbox
from app.delivery.clocksteps import ClockWatch
from app.delivery.retry import (
    BASE_SECONDS,
    CAP_SECONDS,
    POLICIES,
    backoff,
    delivery_deadline,
    next_attempt,
    policy_for,
)
from app.delivery.worker import classify, renew_before_post
from app.peers.client import retry_after_of

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("urgency", sorted(POLICIES))
@pytest.mark.parametrize("attempts", range(1, 40))
def test_backoff_stays_within_its_window(urgency: str, attempts: int) -> None:
    policy = POLICIES[urgency]
    ceiling = min(policy.cap_seconds, policy.base_seconds * 2 ** (attempts - 1))
    for seed in range(10):
        delay = backoff(attempts, policy=policy, rng=random.Random(seed)).total_seconds()
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_grows_then_caps() -> None:
    lows = [backoff(n, rng=random.Random(0)).total_seconds() for n in range(1, 20)]
    assert lows[1] > lows[0]
    assert max(lows) <= CAP_SECONDS
    assert backoff(1, rng=random.Random(0)).total_seconds() <= BASE_SECONDS


def test_backoff_refuses_zero_attempts() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        backoff(0)


def test_emergency_retries_faster_and_gives_up_sooner_than_routine() -> None:
    emergency, urgent, routine = (POLICIES[u] for u in ("emergency", "urgent", "routine"))
    assert emergency.base_seconds < urgent.base_seconds < routine.base_seconds
    assert emergency.cap_seconds < urgent.cap_seconds < routine.cap_seconds
    assert emergency.expiry < urgent.expiry < routine.expiry
    assert policy_for("unheard-of") == routine


def test_deadline_never_outlives_the_envelope() -> None:
    envelope_expiry = NOW + timedelta(days=7)
    assert delivery_deadline(NOW, "emergency", envelope_expiry) == NOW + timedelta(hours=2)
    assert delivery_deadline(NOW, "routine", envelope_expiry) == envelope_expiry
    short = NOW + timedelta(hours=1)
    assert delivery_deadline(NOW, "urgent", short) == short


def test_next_attempt_stops_at_the_deadline() -> None:
    deadline = NOW + timedelta(minutes=5)  # shorter than a capped routine backoff
    first = next_attempt(NOW, 1, "routine", deadline, rng=random.Random(1))
    assert first is not None
    assert NOW < first <= NOW + timedelta(seconds=BASE_SECONDS)
    late = next_attempt(NOW, 30, "routine", deadline, rng=random.Random(1))
    assert late == deadline  # the last try happens at the deadline, not after
    assert next_attempt(deadline, 31, "routine", deadline) is None
    assert next_attempt(NOW, 3, "routine", None) is not None


@pytest.mark.parametrize(
    ("status", "body", "state"),
    [
        (500, None, outbox.RETRY),
        (503, {"error": "database_unavailable"}, outbox.RETRY),
        (429, {"error": "rate_limited"}, outbox.RETRY),
        (403, {"error": "unknown_sender"}, outbox.RETRY),
        (409, {"error": "unknown_conversation"}, outbox.RETRY),
        (400, {"error": "not_yet_valid"}, outbox.RETRY),
        (400, {"error": "bad_signature"}, outbox.FAILED),
        (409, {"error": "replayed"}, outbox.FAILED),
        (413, {"error": "too_large"}, outbox.FAILED),
        (400, {"error": ["not", "a", "code"]}, outbox.FAILED),
        (404, "not json", outbox.FAILED),
    ],
)
def test_peer_answers_are_classified(status: int, body: object, state: str) -> None:
    outcome = classify(status, body)
    assert outcome.state == state
    assert outcome.http_status == status


@pytest.mark.parametrize(
    ("lease", "timeout", "elapsed", "renew"),
    [
        # The defaults: a post may last 130 s; a 300 s lease needs no renewal for most of it.
        (300, 30, 0, False),
        (300, 30, 160, False),
        (300, 30, 170, True),
        # A lease shorter than the longest post (120 s against 130 s: the old default): a
        # post starting 29 s after the claim could outlive it by 40 s, and a second worker
        # would post the same envelope meanwhile. Renewed before every post.
        (120, 30, 0, True),
        (120, 30, 29, True),
        # Short timeouts, short leases (the fault tests): renewed once the margin is gone.
        (60, 3, 30, False),
        (60, 3, 41, True),
    ],
)
def test_a_post_that_could_outlive_its_lease_renews_it_first(
    lease: int, timeout: float, elapsed: int, renew: bool
) -> None:
    settings = Settings(lease_seconds=lease, peer_timeout_seconds=timeout)
    assert renew_before_post(timedelta(seconds=elapsed), settings) is renew


@pytest.mark.parametrize(
    ("status", "value", "seconds"),
    [
        (429, "120", 120.0),
        (503, "0", 0.0),
        (429, "99999999", 3600.0),  # honoured up to an hour: a peer may shed load, not park us
        (429, "Fri, 27 Nov 2026 12:02:00 GMT", 120.0),  # an HTTP date
        (429, "Fri, 27 Nov 2026 11:00:00 GMT", 0.0),  # one already past
        (429, "soon", None),
        (429, "", None),
        (429, "-5", None),
        (429, "\u00b2", None),  # a digit to str.isdigit, not to int()
        (429, "\u0661\u0662", None),  # Arabic-Indic digits: not HTTP's
        (400, "120", None),  # only where RFC 9110 gives it that meaning here
    ],
)
def test_retry_after_is_read_as_rfc_9110_says(
    status: int, value: str, seconds: float | None
) -> None:
    # As bytes, as they come off the wire (httpx encodes str headers as ASCII).
    raw = [(b"retry-after", value.encode())] if value else []
    response = httpx.Response(status, headers=raw)
    assert retry_after_of(response, NOW) == seconds


def test_the_next_attempt_waits_for_what_the_peer_asked_within_the_deadline() -> None:
    asked = NOW + timedelta(minutes=10)
    rng = random.Random(1)
    assert next_attempt(NOW, 1, "routine", None, not_before=asked, rng=rng) == asked
    deadline = NOW + timedelta(minutes=5)
    assert next_attempt(NOW, 1, "routine", deadline, not_before=asked, rng=rng) == deadline
    sooner = NOW + timedelta(milliseconds=1)  # the back-off is longer: it stands
    later = next_attempt(NOW, 5, "routine", None, not_before=sooner, rng=rng)
    assert later is not None
    assert later > sooner


def test_only_a_retry_keeps_the_peers_retry_after() -> None:
    assert classify(429, {"error": "rate_limited"}, 60.0).retry_after == 60.0
    assert classify(400, {"error": "malformed_envelope"}, 60.0).retry_after is None


@pytest.mark.parametrize("urgency", sorted(POLICIES))
def test_past_the_deadline_by_a_clock_not_believed_the_delivery_is_tried_again(
    urgency: str,
) -> None:
    deadline = NOW - timedelta(hours=1)
    assert next_attempt(NOW, 3, urgency, deadline) is None
    when = next_attempt(NOW, 3, urgency, deadline, give_up=False, rng=random.Random(1))
    assert when is not None
    assert NOW < when <= NOW + timedelta(seconds=POLICIES[urgency].cap_seconds)


def test_a_step_of_the_wall_clock_holds_give_ups_for_a_while() -> None:
    watch = ClockWatch(hold_seconds=900)
    watch.observe(NOW, 100.0)
    # An hour on both clocks, with NTP's slew: no step.
    watch.observe(NOW + timedelta(hours=1, seconds=3), 3700.0)
    assert watch.steady(3700.0)
    # A day ahead within a second: a step; and back seven seconds later: another.
    watch.observe(NOW + timedelta(hours=26), 3701.0)
    assert not watch.steady(3701.0)
    watch.observe(NOW + timedelta(hours=1, seconds=10), 3708.0)
    assert not watch.steady(3708.0 + 899)
    assert watch.steady(3708.0 + 900)  # past the hold: the wall clock is believed again
    # A step back is one too.
    watch.observe(NOW - timedelta(hours=2), 4700.0)
    assert not watch.steady(4700.0)
