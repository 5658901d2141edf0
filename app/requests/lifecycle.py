"""The life of a request: which side may move it from which state to which, with which message.

A pure function of (state, the sender's role, the message type). Both nodes apply it to the
same messages: the sending node when its officer submits a message (a refusal is a 409 before
anything is sealed), the receiving node when the envelope arrives (a refusal is an envelope
refusal, and nothing is stored). So both derive the same state from the same messages.

    R: the requested authority sends it; Q: the requesting authority; ai_: additional_information_
    delivered ──R acknowledgement──► acknowledged
    acknowledged | ai_supplied | accepted | postponed ──R ai_request──► ai_requested
    ai_requested ──Q additional_information──► ai_supplied
    acknowledged | ai_requested | ai_supplied | postponed ──R acceptance──► accepted
    acknowledged | ai_requested | ai_supplied | accepted | postponed ──R postponement──► postponed
    acknowledged | ai_requested | ai_supplied | postponed | accepted | partially_executed
        ──R refusal──► refused
    accepted | partially_executed ──R partial_result──► partially_executed, ──R result──► executed
    partially_executed | executed | refused ──Q closure──► closed
    any open state ──Q withdrawal──► withdrawn
    status_query (Q), status_answer (R), consultation and note (both): any open state, no move

The table is built so that two moves crossing in flight (one by each side, from the same
state) end in the same state on both nodes: a requester's withdrawal or closure wins over
whatever the requested authority sent at the same moment (that message is refused as arriving
after the end), and additional information crossing a decision leaves the decision standing.
tests/requests/test_lifecycle.py checks every crossing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from app.domain.messages import MessageType
from app.errors import Conflict


class State(StrEnum):
    QUEUED = "queued"  # requesting side only: sealed, the peer's receipt not yet verified
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    ADDITIONAL_INFORMATION_REQUESTED = "additional_information_requested"
    ADDITIONAL_INFORMATION_SUPPLIED = "additional_information_supplied"
    ACCEPTED = "accepted"
    POSTPONED = "postponed"
    REFUSED = "refused"
    PARTIALLY_EXECUTED = "partially_executed"
    EXECUTED = "executed"
    CLOSED = "closed"
    WITHDRAWN = "withdrawn"


class Role(StrEnum):
    REQUESTING = "requesting"
    REQUESTED = "requested"


TERMINAL = frozenset({State.CLOSED, State.WITHDRAWN})
OPEN = frozenset(State) - TERMINAL


class MessageNotAllowed(Conflict):
    """This side never sends this type of message."""

    code = "message_not_allowed"


class TransitionNotAllowed(Conflict):
    """This side sends this type, but not while the request is in its current state."""

    code = "transition_not_allowed"


S = State
_PRE_DECISION = frozenset(
    {S.ACKNOWLEDGED, S.ADDITIONAL_INFORMATION_REQUESTED, S.ADDITIONAL_INFORMATION_SUPPLIED}
)
_IN_EXECUTION = frozenset({S.ACCEPTED, S.PARTIALLY_EXECUTED})


def _to(target: State, *sources: Iterable[State]) -> dict[State, State]:
    return {source: target for group in sources for source in group}


def _stay(sources: Iterable[State]) -> dict[State, State]:
    return {source: source for source in sources}


# (sender's role, message type) → {state it may be sent in: state after it}.
MOVES: Mapping[tuple[Role, MessageType], Mapping[State, State]] = {
    # The requested authority.
    (Role.REQUESTED, MessageType.ACKNOWLEDGEMENT): _to(S.ACKNOWLEDGED, {S.DELIVERED}),
    (Role.REQUESTED, MessageType.ADDITIONAL_INFORMATION_REQUEST): _to(
        S.ADDITIONAL_INFORMATION_REQUESTED,
        {S.ACKNOWLEDGED, S.ADDITIONAL_INFORMATION_SUPPLIED, S.ACCEPTED, S.POSTPONED},
    ),
    (Role.REQUESTED, MessageType.ACCEPTANCE): _to(S.ACCEPTED, _PRE_DECISION, {S.POSTPONED}),
    (Role.REQUESTED, MessageType.POSTPONEMENT): _to(
        S.POSTPONED, _PRE_DECISION, {S.ACCEPTED, S.POSTPONED}
    ),
    (Role.REQUESTED, MessageType.REFUSAL): _to(
        S.REFUSED, _PRE_DECISION, _IN_EXECUTION, {S.POSTPONED}
    ),
    (Role.REQUESTED, MessageType.PARTIAL_RESULT): _to(S.PARTIALLY_EXECUTED, _IN_EXECUTION),
    (Role.REQUESTED, MessageType.RESULT): _to(S.EXECUTED, _IN_EXECUTION),
    (Role.REQUESTED, MessageType.STATUS_ANSWER): _stay(OPEN),
    (Role.REQUESTED, MessageType.CONSULTATION): _stay(OPEN),
    (Role.REQUESTED, MessageType.NOTE): _stay(OPEN),
    # The requesting authority.
    # Only as the answer to a question: a supplement sent while no question is open could
    # cross a question in flight and be taken for its answer on one side only. Unsolicited
    # information travels as a note.
    (Role.REQUESTING, MessageType.ADDITIONAL_INFORMATION): _to(
        S.ADDITIONAL_INFORMATION_SUPPLIED, {S.ADDITIONAL_INFORMATION_REQUESTED}
    ),
    (Role.REQUESTING, MessageType.WITHDRAWAL): _to(S.WITHDRAWN, OPEN),
    (Role.REQUESTING, MessageType.CLOSURE): _to(
        S.CLOSED, {S.PARTIALLY_EXECUTED, S.EXECUTED, S.REFUSED}
    ),
    (Role.REQUESTING, MessageType.STATUS_QUERY): _stay(OPEN),
    (Role.REQUESTING, MessageType.CONSULTATION): _stay(OPEN),
    (Role.REQUESTING, MessageType.NOTE): _stay(OPEN),
}


def other(role: Role) -> Role:
    return Role.REQUESTED if role is Role.REQUESTING else Role.REQUESTING


def role_of(direction: str) -> Role:
    """This node's role in a request it sent (outbound) or received (inbound)."""
    return Role.REQUESTING if direction == "outbound" else Role.REQUESTED


def may_send(role: Role, message: MessageType) -> bool:
    """Whether this side ever sends this type, whatever the state."""
    return (role, message) in MOVES


def transition(state: State, sender: Role, message: MessageType) -> State:
    """The state after `sender` sends `message` while the request is in `state`.

    A requesting node that has not yet stored the receipt of its request (queued) may already
    hear from the requested authority: for every move, queued counts as delivered.
    """
    sources = MOVES.get((sender, message))
    if sources is None:
        raise MessageNotAllowed(
            f"the {sender.value} authority does not send {message.value} messages"
        )
    effective = State.DELIVERED if state is State.QUEUED else state
    after = sources.get(effective)
    if after is None:
        raise TransitionNotAllowed(
            f"{message.with_article} message from the {sender.value} authority is not allowed "
            f"while the request is {state.value}"
        )
    return state if after is effective else after


def on_send(state: State, side: Role, message: MessageType) -> State:
    """What the node of `side` checks when its own officer submits `message`."""
    return transition(state, side, message)


def on_receive(state: State, side: Role, message: MessageType) -> State:
    """What the node of `side` checks when the other side's `message` arrives."""
    return transition(state, other(side), message)


def after_receipt(state: State) -> State:
    """The first receipt moves a request from queued to delivered, and nothing later back."""
    return State.DELIVERED if state is State.QUEUED else state


def allowed_messages(state: State, side: Role) -> list[MessageType]:
    """The message types `side` may send now, in the order of `MessageType`."""
    effective = State.DELIVERED if state is State.QUEUED else state
    return [
        message for message in MessageType if effective in MOVES.get((side, message), {}).keys()
    ]


def replay(messages: Iterable[tuple[Role, MessageType]], start: State = State.DELIVERED) -> State:
    """The state a conversation's messages lead to, in order; raises on a forbidden one."""
    state = start
    for sender, message in messages:
        state = transition(state, sender, message)
    return state


def parse_state(value: str) -> State:
    """A stored status as a state; values from before the lifecycle map to their successor."""
    return State(_LEGACY.get(value, value))


# Statuses written by nodes before the full lifecycle (the migration rewrites them too).
_LEGACY = {
    "received": State.DELIVERED.value,
    "in_consultation": State.ACKNOWLEDGED.value,
    "answered": State.EXECUTED.value,
}
