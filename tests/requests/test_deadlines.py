"""Deadlines as pure functions of a fixed clock: limits, the requested date, the current due."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from app.config import Settings
from app.requests.deadlines import (
    DEFAULT_LIMITS,
    DEFAULT_OVERRIDES,
    Deadlines,
    TimeLimits,
    applicable_limits,
    compute_deadlines,
    due_at,
    end_of_day,
    is_overdue,
)
from app.requests.lifecycle import State

ARRIVED = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_defaults_are_seven_thirty_ninety_days() -> None:
    limits = applicable_limits("records_production", ["UNTOC_18", "BUDAPEST"])
    assert limits == DEFAULT_LIMITS == TimeLimits(acknowledge=7, decide=30, execute=90)
    deadlines = compute_deadlines(ARRIVED, limits, None)
    assert deadlines == Deadlines(ARRIVED + 7 * DAY, ARRIVED + 30 * DAY, ARRIVED + 90 * DAY)


def test_request_type_override() -> None:
    limits = applicable_limits("expedited_preservation", ["BUDAPEST"])
    assert limits == TimeLimits(acknowledge=1, decide=2, execute=7)


def test_legal_basis_override_may_lengthen_a_limit() -> None:
    # Directive 2014/41/EU: 30 days to recognise, 90 more to execute.
    assert applicable_limits("taking_evidence", ["EU_EIO"]) == TimeLimits(
        acknowledge=7, decide=30, execute=120
    )


def test_when_several_overrides_apply_the_shortest_limit_wins() -> None:
    overrides = {
        "request_type:taking_evidence": TimeLimits(decide=20),
        "legal_basis:ECMA_1959": TimeLimits(decide=25, execute=60),
        "legal_basis:RECIPROCITY": TimeLimits(execute=200),
    }
    limits = applicable_limits("taking_evidence", ["ECMA_1959", "RECIPROCITY"], overrides=overrides)
    assert limits == TimeLimits(acknowledge=7, decide=20, execute=60)
    # An override not applying to this request changes nothing.
    assert applicable_limits("confiscation", ["UNTOC_13"], overrides=overrides) == DEFAULT_LIMITS


def test_a_limit_can_be_switched_off() -> None:
    limits = applicable_limits(
        "other_mla", [], defaults=TimeLimits(acknowledge=7, decide=None, execute=None)
    )
    assert compute_deadlines(ARRIVED, limits, None) == Deadlines(ARRIVED + 7 * DAY, None, None)


def test_an_earlier_requested_date_replaces_every_later_limit() -> None:
    requested = dt.date(2026, 3, 5)
    deadlines = compute_deadlines(ARRIVED, DEFAULT_LIMITS, requested)
    cap = dt.datetime(2026, 3, 6, tzinfo=dt.UTC)  # the requested day is over in UTC
    assert end_of_day(requested) == cap
    assert deadlines == Deadlines(cap, cap, cap)


def test_a_later_requested_date_replaces_only_the_limits_after_it() -> None:
    requested = dt.date(2026, 3, 20)
    cap = dt.datetime(2026, 3, 21, tzinfo=dt.UTC)
    deadlines = compute_deadlines(ARRIVED, DEFAULT_LIMITS, requested)
    assert deadlines == Deadlines(ARRIVED + 7 * DAY, cap, cap)
    no_limits = TimeLimits()
    assert compute_deadlines(ARRIVED, no_limits, requested) == Deadlines(cap, cap, cap)


DEADLINES = Deadlines(ARRIVED + 7 * DAY, ARRIVED + 30 * DAY, ARRIVED + 90 * DAY)
POSTPONED_UNTIL = dt.date(2026, 6, 1)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (State.QUEUED, DEADLINES.acknowledge_by),
        (State.DELIVERED, DEADLINES.acknowledge_by),
        (State.ACKNOWLEDGED, DEADLINES.decide_by),
        (State.ADDITIONAL_INFORMATION_REQUESTED, DEADLINES.decide_by),
        (State.ADDITIONAL_INFORMATION_SUPPLIED, DEADLINES.decide_by),
        (State.ACCEPTED, DEADLINES.execute_by),
        (State.PARTIALLY_EXECUTED, DEADLINES.execute_by),
        (State.POSTPONED, dt.datetime(2026, 6, 2, tzinfo=dt.UTC)),
        (State.REFUSED, None),
        (State.EXECUTED, None),
        (State.CLOSED, None),
        (State.WITHDRAWN, None),
    ],
)
def test_the_current_deadline_follows_the_state(state: State, expected: dt.datetime) -> None:
    assert due_at(state, DEADLINES, POSTPONED_UNTIL) == expected


def test_a_postponement_without_a_date_has_no_deadline() -> None:
    assert due_at(State.POSTPONED, DEADLINES, None) is None


def test_overdue_is_strictly_after_the_deadline() -> None:
    due = ARRIVED + 7 * DAY
    assert not is_overdue(due, due - dt.timedelta(microseconds=1))
    assert not is_overdue(due, due)
    assert is_overdue(due, due + dt.timedelta(microseconds=1))
    assert not is_overdue(None, due + 1000 * DAY)


def test_settings_carry_the_limits_and_refuse_unknown_keys() -> None:
    settings = Settings()
    assert settings.time_limits == DEFAULT_LIMITS
    assert settings.time_limit_overrides == DEFAULT_OVERRIDES
    custom = Settings(time_limit_overrides={"legal_basis:ECMA_1959": {"decide": 45}})
    assert custom.time_limit_overrides == {"legal_basis:ECMA_1959": TimeLimits(decide=45)}
    for key in ("legal_basis:HAGUE_1970", "request_type:visit", "ECMA_1959"):
        with pytest.raises(ValidationError, match="time limit override"):
            Settings(time_limit_overrides={key: {"decide": 45}})
    with pytest.raises(ValidationError):
        Settings(time_limits={"acknowledge": -1})
