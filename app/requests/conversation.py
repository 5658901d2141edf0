"""The lifecycle and the deadlines, applied to a request row: when a request is opened on either
side, when this node's officer sends a message, and when the peer's message arrives.

The rules themselves are pure (lifecycle.py, deadlines.py); this module only reads and writes
the routing metadata they decide (status, due dates, handling), in the caller's transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.domain.document import ConfidentialityLevel, RequestDocument
from app.domain.messages import MessageDocument, MessageType
from app.errors import EnvelopeRefused
from app.models import CaseFile, Message
from app.requests import deadlines, lifecycle
from app.requests.lifecycle import OPEN, Role, State

OUTBOUND = "outbound"  # a message this node sent (Message.direction)


def _stored_deadlines(case: CaseFile) -> deadlines.Deadlines:
    return deadlines.Deadlines(case.acknowledge_by, case.decide_by, case.execute_by)


def set_deadlines(
    case: CaseFile, settings: Settings, document: RequestDocument, *, now: datetime
) -> None:
    """Deadlines and handling of a request just submitted (outbound) or arrived (inbound)."""
    limits = deadlines.applicable_limits(
        document.request_type.value,
        [basis.instrument.value for basis in document.legal_basis],
        defaults=settings.time_limits,
        overrides=settings.time_limit_overrides,
    )
    computed = deadlines.compute_deadlines(now, limits, document.urgency.requested_date)
    case.requested_date = document.urgency.requested_date
    case.acknowledge_by = computed.acknowledge_by
    case.decide_by = computed.decide_by
    case.execute_by = computed.execute_by
    case.postponed_until = None
    case.due_at = deadlines.due_at(lifecycle.parse_state(case.status), computed, None)
    case.handling = document.confidentiality.level.value
    case.restricted = False


def open_inbound(
    session: Session,
    settings: Settings,
    *,
    request_id: str,
    peer: str,
    document: RequestDocument,
    now: datetime,
) -> CaseFile:
    case = CaseFile(
        id=request_id,
        direction="inbound",
        peer_authority=peer,
        status=State.DELIVERED.value,
        urgency=document.urgency.level.value,
        created_at=now,
        updated_at=now,
    )
    set_deadlines(case, settings, document, now=now)
    # Need-to-know: fail closed. No officer of ours sees it until an administrator names the
    # officers who may (app/requests/access.py); the requesting authority cannot name them,
    # it does not know who works here.
    case.restricted = document.confidentiality.level is ConfidentialityLevel.NEED_TO_KNOW
    session.add(case)
    session.flush()
    return case


def apply(case: CaseFile, *, sender: Role, document: MessageDocument, now: datetime) -> State:
    """Move the request for a message from `sender`. Raises `MessageNotAllowed` or
    `TransitionNotAllowed` (both 409) and changes nothing when the move is forbidden."""
    after = lifecycle.transition(lifecycle.parse_state(case.status), sender, document.type)
    case.status = after.value
    if document.type is MessageType.POSTPONEMENT:
        case.postponed_until = document.until
    case.due_at = deadlines.due_at(after, _stored_deadlines(case), case.postponed_until)
    case.updated_at = now
    return after


def send(case: CaseFile, *, document: MessageDocument, now: datetime) -> State:
    """This node's officer sends `document`: judged before anything is sealed."""
    return apply(case, sender=lifecycle.role_of(case.direction), document=document, now=now)


def receive(
    session: Session,
    case: CaseFile,
    *,
    in_reply_to: str | None,
    document: MessageDocument,
    now: datetime,
) -> State:
    """The peer's message arrives: the protocol's checks 36-38 (docs/protocol.md section 9)."""
    sender = lifecycle.other(lifecycle.role_of(case.direction))
    if not lifecycle.may_send(sender, document.type):
        raise EnvelopeRefused(
            "message_not_allowed",
            f"the {sender.value} authority does not send {document.type.value} messages",
            status_code=409,
        )
    # Messages of one sender may arrive out of order (a delivery backing off is overtaken by
    # the next one). A message follows the one it replies to: until that one is here, ask the
    # sender to retry (425), rather than judge the move against a state it did not see.
    state = lifecycle.parse_state(case.status)
    if state in OPEN and in_reply_to is not None and not _known(session, case, in_reply_to):
        raise EnvelopeRefused(
            "predecessor_missing",
            "the message this one follows (in_reply_to) has not arrived yet; retry later",
            status_code=425,
        )
    if (
        document.type is MessageType.ADDITIONAL_INFORMATION
        and case.question_msg_id is not None
        and not _follows(session, case, in_reply_to, case.question_msg_id)
    ):
        # Its sender had not seen our latest question: it answers an earlier one, which a
        # decision of ours and a new question crossed. Taken as the answer here, it would
        # leave the two nodes at different statuses (the sender's officer answers again).
        raise EnvelopeRefused(
            "transition_not_allowed",
            "this additional information answers an earlier question than the latest one",
            status_code=409,
        )
    try:
        return apply(case, sender=sender, document=document, now=now)
    except lifecycle.TransitionNotAllowed as exc:
        raise EnvelopeRefused(exc.code, exc.detail, status_code=409) from exc


# How far back `_follows` walks a conversation: a question is answered within a few
# messages; past this many, the answer is taken as following it (the judgement before).
FOLLOWS_WALK = 1000


def _follows(session: Session, case: CaseFile, msg_id: str | None, question: str) -> bool:
    """Whether the peer sent `msg_id` (the message an answer follows) having seen our
    `question`. Each message names the newest one its sender knew (`in_reply_to`): walking
    back from `msg_id`, reaching the question, or one of our messages sent after it, says it
    had; reaching a message stored here before the question says it had not (its answer
    crossed the question). The peer's own messages on the way are walked through."""
    rows = {
        found_id: (number, previous, direction)
        for found_id, number, previous, direction in session.execute(
            select(Message.msg_id, Message.id, Message.in_reply_to, Message.direction).where(
                Message.request_id == case.id
            )
        )
    }
    asked = rows.get(question)
    if asked is None:  # not stored here (a restore from an older backup): judged as before
        return True
    for _ in range(FOLLOWS_WALK):
        if msg_id is None or msg_id not in rows:
            return False
        number, previous, direction = rows[msg_id]
        if number < asked[0]:
            return False  # stored before the question: sent without having seen it
        if msg_id == question or direction == OUTBOUND:
            return True
        msg_id = previous
    return True


def _known(session: Session, case: CaseFile, msg_id: str) -> bool:
    found = session.scalar(
        select(Message.id).where(Message.request_id == case.id, Message.msg_id == msg_id)
    )
    return found is not None
