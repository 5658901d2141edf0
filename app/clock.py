"""The clock, as a dependency: routes that judge time (deadlines) ask for it, tests fix it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends

from app.crypto.encoding import utc_now

Clock = Callable[[], datetime]


def get_clock() -> Clock:
    """Override in tests: `app.dependency_overrides[get_clock] = lambda: lambda: fixed`."""
    return utc_now


ClockDep = Annotated[Clock, Depends(get_clock)]
