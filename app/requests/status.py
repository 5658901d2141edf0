"""How a request's status follows from its messages (the full state machine comes later).

Both nodes apply the same rules to the same messages, so they agree on the status.
"""

from __future__ import annotations

QUEUED = "queued"
DELIVERED = "delivered"
RECEIVED = "received"

_AFTER_MESSAGE = {
    "acknowledgement": "acknowledged",
    "additional_information_request": "additional_information_requested",
    "additional_information": "additional_information_supplied",
    "consultation": "in_consultation",
    "result": "answered",
}


def status_after_message(current: str, message_type: str) -> str:
    return _AFTER_MESSAGE.get(message_type, current)


def status_after_receipt(current: str) -> str:
    """The first receipt moves a request from queued to delivered, and nothing later back."""
    return DELIVERED if current == QUEUED else current
