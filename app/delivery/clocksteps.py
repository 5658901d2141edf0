"""Noticing that this host's wall clock stepped, so that deadlines are not judged by a step.

Deadlines and backoffs are stored as wall-clock times, for every process and every restart
to read. A wall clock stepped forward for a few seconds (a wrong NTP answer, an operator's
typo, a VM restored from a snapshot) once made every pending urgent and emergency delivery
"give up at its deadline" although seconds had passed (from review). A step shows as the wall
clock moving apart from the boot clock, which no one sets: the worker watches both, and for
a while after a step lets no deadline fail a delivery (it is tried again instead, and the
step is logged). Past that while, the new wall clock is believed (it may have been the
correction of a wrong one).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

log = logging.getLogger(__name__)

# How far the two clocks may drift apart between two readings before it counts as a step:
# NTP slews a clock by at most 500 ppm; a step is seconds at least.
STEP_SECONDS = 2.0
SLEW_RATE = 0.001
# How long after a step no deadline fails a delivery.
HOLD_SECONDS = 900.0


def boot_clock() -> float:
    """Seconds since boot, suspended time included (a host asleep for hours does see hours
    go by), never set by anyone."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


class ClockWatch:
    """Readings of the wall clock against the boot clock, taken by one thread (the worker's
    loop): `observe` each reading, `steady` whether a deadline may be judged by it."""

    def __init__(self, hold_seconds: float = HOLD_SECONDS) -> None:
        self.hold_seconds = hold_seconds
        self._last: tuple[datetime, float] | None = None
        self._stepped_at: float | None = None  # the boot clock at the latest step seen

    def observe(self, wall: datetime, boot: float) -> None:
        if self._last is not None:
            last_wall, last_boot = self._last
            elapsed = boot - last_boot
            moved = (wall - last_wall).total_seconds()
            if abs(moved - elapsed) > STEP_SECONDS + SLEW_RATE * max(elapsed, 0.0):
                self._stepped_at = boot
                log.error(
                    "the wall clock stepped by %+.0f s: deliveries past their deadline are "
                    "not given up for the next %.0f s (check NTP)",
                    moved - elapsed,
                    self.hold_seconds,
                )
        self._last = (wall, boot)

    def steady(self, boot: float) -> bool:
        """Whether no step was seen within the hold."""
        return self._stepped_at is None or boot - self._stepped_at >= self.hold_seconds
