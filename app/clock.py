"""The clock, as a dependency: routes that judge time (deadlines) ask for it, tests fix it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends
from pydantic import AfterValidator, AwareDatetime

from app.crypto.encoding import utc_now

Clock = Callable[[], datetime]


def get_clock() -> Clock:
    """Override in tests: `app.dependency_overrides[get_clock] = lambda: lambda: fixed`."""
    return utc_now


ClockDep = Annotated[Clock, Depends(get_clock)]


def in_utc(moment: datetime) -> datetime:
    """The moment in UTC, as the database stores it; ValueError for one that UTC cannot
    hold (0001-01-01 east of UTC, 9999-12-31 west of it): a 422, not a 500 at the query."""
    try:
        return moment.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError("the moment is outside the range of dates this node stores") from exc


# A query parameter that is a moment: with a zone (a naive time is ambiguous), in range.
UtcMoment = Annotated[AwareDatetime, AfterValidator(in_utc)]


class Every:
    """When a background job of a node's loop is due: at once the first time it is asked,
    then once per period (a monotonic clock, so a changed wall clock moves nothing)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._due = clock()

    def due(self) -> bool:
        now = self._clock()
        if now < self._due:
            return False
        self._due = now + self.seconds
        return True
