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


REQUESTING = "requesting"
REQUESTED = "requested"

# Who may say what in a conversation. The requested authority acknowledges, asks for more
# information and answers; the requesting authority supplies information and asks for news.
_MAY_SEND = {
    REQUESTING: {"additional_information", "status_query", "consultation", "note"},
    REQUESTED: {
        "acknowledgement",
        "additional_information_request",
        "status_answer",
        "consultation",
        "result",
        "note",
    },
}


def role_of(direction: str) -> str:
    """Our role in a request we sent (outbound) or received (inbound)."""
    return REQUESTING if direction == "outbound" else REQUESTED


def other_role(role: str) -> str:
    return REQUESTED if role == REQUESTING else REQUESTING


def may_send(role: str, message_type: str) -> bool:
    return message_type in _MAY_SEND[role]


# A request only moves forward; the additional-information exchange may repeat.
_RANK = {
    QUEUED: 0,
    DELIVERED: 1,
    RECEIVED: 1,
    "acknowledged": 2,
    "additional_information_requested": 3,
    "additional_information_supplied": 3,
    "in_consultation": 3,
    "answered": 4,
}


def status_after_message(current: str, message_type: str) -> str:
    proposed = _AFTER_MESSAGE.get(message_type, current)
    return proposed if _RANK.get(proposed, 0) >= _RANK.get(current, 0) else current


def status_after_receipt(current: str) -> str:
    """The first receipt moves a request from queued to delivered, and nothing later back."""
    return DELIVERED if current == QUEUED else current
