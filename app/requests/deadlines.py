"""Deadlines of a request: time limits per request type and legal basis, and the requested date.

Pure: the clock is always an argument. Each node computes its own deadlines when a request is
submitted (requesting side: when to expect an answer) or arrives (requested side: when it must
act), from its own settings, and keeps them as routing metadata on the request row. The
request's current deadline (`due_at`) follows its state: acknowledge, then decide, then
execute; a postponement sets it to the end of the postponement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from app.domain.document import LegalBasisInstrument, RequestType
from app.requests.lifecycle import State

MAX_DAYS = 3650


class TimeLimits(BaseModel):
    """Days from a request's arrival by which it is to be acknowledged, decided, executed.

    In an override, a limit left out (null) falls back to the defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    acknowledge: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    decide: int | None = Field(default=None, ge=0, le=MAX_DAYS)
    execute: int | None = Field(default=None, ge=0, le=MAX_DAYS)


DEFAULT_LIMITS = TimeLimits(acknowledge=7, decide=30, execute=90)

# Keys: "request_type:<RequestType>" or "legal_basis:<LegalBasisInstrument>".
DEFAULT_OVERRIDES: dict[str, TimeLimits] = {
    # Significant and imminent risk to life or safety (CETS 224 arts. 9, 10): hours, not weeks.
    "request_type:emergency_assistance": TimeLimits(acknowledge=1, decide=1, execute=3),
    # Budapest arts. 29, 30: "expeditiously"; data may be deleted any day.
    "request_type:expedited_preservation": TimeLimits(acknowledge=1, decide=2, execute=7),
    "request_type:expedited_disclosure": TimeLimits(acknowledge=1, decide=2, execute=7),
    "request_type:provisional_arrest": TimeLimits(acknowledge=1, decide=2, execute=7),
    # Directive 2014/41/EU: acknowledge within a week (art. 16(1), Annex B), decide on
    # recognition within 30 days (art. 12(3)), execute within 90 days of that (art. 12(4)).
    "legal_basis:EU_EIO": TimeLimits(acknowledge=7, decide=30, execute=120),
}

_KEY_KINDS = {
    "request_type": {member.value for member in RequestType},
    "legal_basis": {member.value for member in LegalBasisInstrument},
}


def check_override_key(key: str) -> str:
    kind, _, value = key.partition(":")
    if value not in _KEY_KINDS.get(kind, set()):
        raise ValueError(
            f"time limit override {key!r} is not request_type:<type> or legal_basis:<instrument>"
        )
    return key


def applicable_limits(
    request_type: str,
    instruments: Iterable[str],
    *,
    defaults: TimeLimits = DEFAULT_LIMITS,
    overrides: Mapping[str, TimeLimits] = DEFAULT_OVERRIDES,
) -> TimeLimits:
    """The limits for a request: the overrides that apply replace the defaults, limit by
    limit; where several overrides set the same limit, the shortest wins."""
    keys = [f"request_type:{request_type}", *(f"legal_basis:{i}" for i in instruments)]
    rules = [overrides[key] for key in keys if key in overrides]

    def pick(name: str) -> int | None:
        values: list[int] = [v for rule in rules if (v := getattr(rule, name)) is not None]
        fallback: int | None = getattr(defaults, name)
        return min(values) if values else fallback

    return TimeLimits(
        acknowledge=pick("acknowledge"), decide=pick("decide"), execute=pick("execute")
    )


def end_of_day(day: dt.date) -> dt.datetime:
    """A date as a deadline: it is past once that day is over in UTC."""
    if day == dt.date.max:
        # 9999-12-31, which a peer or an officer may send, has no next day; and a time near
        # datetime.max overflows as soon as a PostgreSQL session east of UTC shows it. Its
        # start is a deadline as far off as any.
        return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


@dataclass(frozen=True)
class Deadlines:
    acknowledge_by: dt.datetime | None
    decide_by: dt.datetime | None
    execute_by: dt.datetime | None


def compute_deadlines(
    arrived_at: dt.datetime, limits: TimeLimits, requested_date: dt.date | None
) -> Deadlines:
    """Each limit counts from the arrival; a requested date earlier than a limit replaces it
    (UNTOC 18(24): the deadlines the requesting State gives reasons for)."""
    cap = end_of_day(requested_date) if requested_date is not None else None

    def due(days: int | None) -> dt.datetime | None:
        candidates = [arrived_at + dt.timedelta(days=days)] if days is not None else []
        if cap is not None:
            candidates.append(cap)
        return min(candidates) if candidates else None

    return Deadlines(due(limits.acknowledge), due(limits.decide), due(limits.execute))


_AWAITING_ACKNOWLEDGEMENT = {State.QUEUED, State.DELIVERED}
_AWAITING_DECISION = {
    State.ACKNOWLEDGED,
    State.ADDITIONAL_INFORMATION_REQUESTED,
    State.ADDITIONAL_INFORMATION_SUPPLIED,
}
_AWAITING_EXECUTION = {State.ACCEPTED, State.PARTIALLY_EXECUTED}


def due_at(
    state: State, deadlines: Deadlines, postponed_until: dt.date | None
) -> dt.datetime | None:
    """The deadline the request is working towards in `state`; None once nothing is owed."""
    if state in _AWAITING_ACKNOWLEDGEMENT:
        return deadlines.acknowledge_by
    if state in _AWAITING_DECISION:
        return deadlines.decide_by
    if state in _AWAITING_EXECUTION:
        return deadlines.execute_by
    if state is State.POSTPONED:
        return end_of_day(postponed_until) if postponed_until is not None else None
    return None  # refused, executed, closed, withdrawn


def is_overdue(due: dt.datetime | None, now: dt.datetime) -> bool:
    return due is not None and due < now
