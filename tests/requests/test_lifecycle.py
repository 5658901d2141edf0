"""The state machine, every (state, side, message) combination, from both nodes' point of view.

The expected table is written out here by hand, independently of app/requests/lifecycle.py:
a change to the rules must change both.
"""

from __future__ import annotations

import itertools

import pytest

from app.domain.messages import MessageType
from app.requests.lifecycle import (
    OPEN,
    TERMINAL,
    MessageNotAllowed,
    Role,
    State,
    TransitionNotAllowed,
    after_receipt,
    allowed_messages,
    on_receive,
    on_send,
    other,
    parse_state,
    replay,
    transition,
)

Q, R = Role.REQUESTING, Role.REQUESTED
M = MessageType

OPEN_STATES = [
    "delivered",
    "acknowledged",
    "additional_information_requested",
    "additional_information_supplied",
    "accepted",
    "postponed",
    "refused",
    "partially_executed",
    "executed",
]


def _stay(states: list[str]) -> dict[str, str]:
    return {state: state for state in states}


EXPECTED: dict[tuple[Role, MessageType], dict[str, str]] = {
    (R, M.ACKNOWLEDGEMENT): {"delivered": "acknowledged"},
    (R, M.ADDITIONAL_INFORMATION_REQUEST): dict.fromkeys(
        ["acknowledged", "additional_information_supplied", "accepted", "postponed"],
        "additional_information_requested",
    ),
    (R, M.ACCEPTANCE): dict.fromkeys(
        [
            "acknowledged",
            "additional_information_requested",
            "additional_information_supplied",
            "postponed",
        ],
        "accepted",
    ),
    (R, M.POSTPONEMENT): dict.fromkeys(
        [
            "acknowledged",
            "additional_information_requested",
            "additional_information_supplied",
            "accepted",
            "postponed",
        ],
        "postponed",
    ),
    (R, M.REFUSAL): dict.fromkeys(
        [
            "acknowledged",
            "additional_information_requested",
            "additional_information_supplied",
            "accepted",
            "postponed",
            "partially_executed",
        ],
        "refused",
    ),
    (R, M.PARTIAL_RESULT): dict.fromkeys(["accepted", "partially_executed"], "partially_executed"),
    (R, M.RESULT): dict.fromkeys(["accepted", "partially_executed"], "executed"),
    (R, M.STATUS_ANSWER): _stay(OPEN_STATES),
    (R, M.CONSULTATION): _stay(OPEN_STATES),
    (R, M.NOTE): _stay(OPEN_STATES),
    (Q, M.ADDITIONAL_INFORMATION): {
        "additional_information_requested": "additional_information_supplied"
    },
    (Q, M.WITHDRAWAL): dict.fromkeys(OPEN_STATES, "withdrawn"),
    (Q, M.CLOSURE): dict.fromkeys(["partially_executed", "executed", "refused"], "closed"),
    (Q, M.STATUS_QUERY): _stay(OPEN_STATES),
    (Q, M.CONSULTATION): _stay(OPEN_STATES),
    (Q, M.NOTE): _stay(OPEN_STATES),
}


def _expected(state: State, sender: Role, message: MessageType) -> str:
    """The hand-written verdict: the next state, or the refusal's code."""
    moves = EXPECTED.get((sender, message))
    if moves is None:
        return "message_not_allowed"
    # Before the receipt is stored, the requesting node's request is queued: to every move
    # it is delivered, and a message that moves nothing leaves it queued.
    source = "delivered" if state is State.QUEUED else state.value
    if source not in moves:
        return "transition_not_allowed"
    target = moves[source]
    return state.value if target == source else target


def _verdict(move: object, *args: object) -> str:
    try:
        return str(move(*args))  # type: ignore[operator]  # the functions under test
    except (MessageNotAllowed, TransitionNotAllowed) as exc:
        return exc.code


CASES = list(itertools.product(State, Role, MessageType))


@pytest.mark.parametrize(
    ("state", "sender", "message"),
    CASES,
    ids=[f"{s.value}-{r.value}-{m.value}" for s, r, m in CASES],
)
def test_every_transition_on_both_sides(state: State, sender: Role, message: MessageType) -> None:
    expected = _expected(state, sender, message)
    # The sender's node, when its officer submits the message ...
    assert _verdict(on_send, state, sender, message) == expected
    # ... and the other node, when the envelope arrives: the same verdict.
    assert _verdict(on_receive, state, other(sender), message) == expected


def test_the_table_covers_every_combination() -> None:
    verdicts = [_expected(s, r, m) for s, r, m in CASES]
    assert len(verdicts) == len(State) * 2 * len(MessageType) == 336
    allowed = [v for v in verdicts if v not in {"message_not_allowed", "transition_not_allowed"}]
    assert len(allowed) == 99
    assert verdicts.count("message_not_allowed") == 12 * (28 - 16)


def test_refusals_name_the_side_and_the_state() -> None:
    with pytest.raises(TransitionNotAllowed) as caught:
        transition(State.ACKNOWLEDGED, R, M.RESULT)
    assert caught.value.status_code == 409
    assert caught.value.detail == (
        "a result message from the requested authority is not allowed while the request is "
        "acknowledged"
    )
    with pytest.raises(MessageNotAllowed) as refused:
        transition(State.ACKNOWLEDGED, Q, M.ACCEPTANCE)
    assert refused.value.status_code == 409
    assert "requesting authority does not send acceptance" in refused.value.detail


def test_refusals_name_the_message_with_the_right_article() -> None:
    """`a acknowledgement message ...` read the error details before."""
    with pytest.raises(TransitionNotAllowed) as caught:
        transition(State.CLOSED, R, M.ACKNOWLEDGEMENT)
    assert caught.value.detail.startswith("an acknowledgement message from the requested")
    assert [m.with_article for m in (M.ACCEPTANCE, M.RESULT, M.ADDITIONAL_INFORMATION)] == [
        "an acceptance",
        "a result",
        "an additional_information",
    ]


def test_terminal_states_accept_nothing() -> None:
    assert {State.CLOSED, State.WITHDRAWN} == TERMINAL
    for state, sender, message in itertools.product(TERMINAL, Role, MessageType):
        assert _verdict(transition, state, sender, message) != state.value
        assert allowed_messages(state, sender) == []


@pytest.mark.parametrize(("state", "side"), list(itertools.product(State, Role)))
def test_allowed_messages_are_exactly_the_accepted_ones(state: State, side: Role) -> None:
    accepted = [m for m in MessageType if not _expected(state, side, m).endswith("_allowed")]
    assert allowed_messages(state, side) == accepted


def test_two_moves_crossing_in_flight_end_in_the_same_state_on_both_nodes() -> None:
    """Each side sends from the same state before seeing the other's message; each node
    judges the other's message against its own new state (refusing it if forbidden)."""
    crossings = 0
    for start in OPEN - {State.QUEUED}:  # the requested node never has a queued request
        requesting_start = State.QUEUED if start is State.DELIVERED else start
        for ours, theirs in itertools.product(MessageType, MessageType):
            try:
                at_requesting = on_send(requesting_start, Q, ours)
                at_requested = on_send(start, R, theirs)
            except (MessageNotAllowed, TransitionNotAllowed):
                continue  # not a move either side could have made
            crossings += 1
            try:
                at_requesting = on_receive(at_requesting, Q, theirs)
            except TransitionNotAllowed:
                pass  # refused: the requested node's message fails delivery, nothing stored
            try:
                at_requested = on_receive(at_requested, R, ours)
            except TransitionNotAllowed:
                pass
            assert after_receipt(at_requesting) == at_requested, (start, ours, theirs)
    assert crossings > 150


def test_every_state_is_reachable_and_every_open_state_can_end() -> None:
    reachable = {State.DELIVERED}
    frontier = [State.DELIVERED]
    while frontier:
        state = frontier.pop()
        for side in Role:
            for message in allowed_messages(state, side):
                after = transition(state, side, message)
                if after not in reachable:
                    reachable.add(after)
                    frontier.append(after)
    assert reachable == set(State) - {State.QUEUED}
    for state in OPEN:
        assert M.WITHDRAWAL in allowed_messages(state, Q)


def test_a_full_life_replays_to_the_same_state_on_either_node() -> None:
    life = [
        (R, M.ACKNOWLEDGEMENT),
        (R, M.ADDITIONAL_INFORMATION_REQUEST),
        (Q, M.ADDITIONAL_INFORMATION),
        (R, M.CONSULTATION),
        (Q, M.CONSULTATION),
        (R, M.ACCEPTANCE),
        (Q, M.STATUS_QUERY),
        (R, M.STATUS_ANSWER),
        (R, M.POSTPONEMENT),
        (R, M.ACCEPTANCE),
        (R, M.PARTIAL_RESULT),
        (R, M.RESULT),
        (Q, M.CLOSURE),
    ]
    assert replay(life) is State.CLOSED
    assert replay(life, start=State.QUEUED) is State.CLOSED
    assert replay(life[:1], start=State.QUEUED) is State.ACKNOWLEDGED
    assert replay([(Q, M.NOTE)], start=State.QUEUED) is State.QUEUED
    with pytest.raises(TransitionNotAllowed):
        replay([*life[:1], (R, M.RESULT)])


def test_receipts_and_legacy_statuses() -> None:
    assert after_receipt(State.QUEUED) is State.DELIVERED
    for state in set(State) - {State.QUEUED}:
        assert after_receipt(state) is state
    assert parse_state("received") is State.DELIVERED
    assert parse_state("answered") is State.EXECUTED
    assert parse_state("in_consultation") is State.ACKNOWLEDGED
    assert parse_state("accepted") is State.ACCEPTED
    with pytest.raises(ValueError, match="not a valid State"):
        parse_state("lost")
