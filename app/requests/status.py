"""Request statuses, for modules that only need the transport end of the lifecycle.

The rules live in app/requests/lifecycle.py (the pure state machine); this module keeps the
names older callers import (the delivery worker moves a request from queued to delivered when
it stores the receipt).
"""

from __future__ import annotations

from app.requests.lifecycle import State, after_receipt

QUEUED = State.QUEUED.value
DELIVERED = State.DELIVERED.value
# A request that arrived: "delivered" on both sides, so both nodes show the same status.
RECEIVED = State.DELIVERED.value


def status_after_receipt(current: str) -> str:
    """The first receipt moves a request from queued to delivered, and nothing later back."""
    try:
        return after_receipt(State(current)).value
    except ValueError:  # a status this version does not know: leave it to the lifecycle
        return current
