"""Messages exchanged in a request's conversation after the request itself.

Each is sealed and signed like the request, so the same strictness applies. Every message has a
`type` and a covering `text`; some types carry structured content as well, and the rules of
which type needs or may carry which field are one table (`TYPE_FIELDS`), so that a refusal
without reasons or a postponement without a date is refused at the field at fault.

Which side may send which type, in which state of the request, is not a property of the
message: app/requests/lifecycle.py decides that.
"""

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Annotated, Self

from pydantic import AwareDatetime, Field, StrictInt, StringConstraints, model_validator

from app.domain.document import (
    DomainModel,
    Label,
    Loc,
    LongText,
    References,
    RefId,
    SchemaVersion,
    Text,
    _reject,
)


class MessageType(StrEnum):
    ACKNOWLEDGEMENT = "acknowledgement"
    ADDITIONAL_INFORMATION_REQUEST = "additional_information_request"
    ADDITIONAL_INFORMATION = "additional_information"
    CONSULTATION = "consultation"
    ACCEPTANCE = "acceptance"
    POSTPONEMENT = "postponement"
    REFUSAL = "refusal"
    PARTIAL_RESULT = "partial_result"
    RESULT = "result"
    CLOSURE = "closure"
    WITHDRAWAL = "withdrawal"
    STATUS_QUERY = "status_query"
    STATUS_ANSWER = "status_answer"
    NOTE = "note"

    @property
    def with_article(self) -> str:
        """`an acknowledgement`, `a closure`: as error details name a message."""
        return f"{'an' if self.value[0] in 'aeiou' else 'a'} {self.value}"


class RefusalGround(StrEnum):
    """Grounds for refusing assistance. Bank secrecy (UNTOC 18(8)) and the fiscal nature of
    the offence alone (18(22)) are not grounds, so they are not listed."""

    NOT_IN_CONFORMITY = "not_in_conformity"  # UNTOC 18(21)(a)
    ESSENTIAL_INTERESTS = "essential_interests"  # 18(21)(b): sovereignty, security, ordre public
    DOMESTIC_LAW_PROHIBITS = "domestic_law_prohibits"  # 18(21)(c)
    CONTRARY_TO_LEGAL_SYSTEM = "contrary_to_legal_system"  # 18(21)(d)
    NO_DUAL_CRIMINALITY = "no_dual_criminality"  # 18(9)
    POLITICAL_OFFENCE = "political_offence"  # ECMA 1959 art. 2(a); Budapest 27(4)(a)
    NE_BIS_IN_IDEM = "ne_bis_in_idem"
    DISCRIMINATION = "discrimination"  # UNTOC 16(14): prosecution on account of sex, race ...
    DEATH_PENALTY = "death_penalty"
    INSUFFICIENT_INFORMATION = "insufficient_information"
    OTHER = "other"


class RefusalReason(DomainModel):
    ground: RefusalGround
    # UNTOC 18(23): "Reasons shall be given for any refusal of mutual legal assistance."
    explanation: Text


class CustodyAction(StrEnum):
    SEIZED = "seized"
    RECEIVED = "received"
    COPIED = "copied"
    SEALED = "sealed"
    EXAMINED = "examined"
    STORED = "stored"
    TRANSFERRED = "transferred"
    OTHER = "other"


class CustodyEvent(DomainModel):
    at: AwareDatetime
    action: CustodyAction
    by: Label
    place: Label | None = None
    note: Text | None = None


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class EvidenceItem(DomainModel):
    """One item of evidence in an execution result, as its sender attests it."""

    ref: RefId
    description: Text  # what it is
    obtained_at: AwareDatetime  # when it was obtained
    obtained_from: Label | None = None  # from whom: a bank, a provider, a witness
    sha256: Sha256Hex  # of the item as sent; for an attached item, of the attachment's bytes
    # Its index among the attachments: 1 to 32, as protocol v1 has it (peers of earlier
    # releases refuse more, and a result refused so never arrives: from review). A draft
    # allowed more attachments (ENTRAIDE_MAX_EVIDENCE_ATTACHMENTS up to 63) attests the
    # first 32 by index; the others travel, hashed in the manifest, without an item.
    attachment: StrictInt | None = Field(default=None, ge=1, le=32)
    use_limitation: Text  # UNTOC 18(19): the proceedings it may be used in
    custody: tuple[CustodyEvent, ...] = Field(default=(), max_length=50)

    @model_validator(mode="after")
    def _custody_in_order(self) -> Self:
        problems: list[tuple[Loc, str, str, object]] = []
        previous = self.obtained_at
        for i, event in enumerate(self.custody):
            if event.at < previous:
                msg = "custody events are in time order, none before the item was obtained"
                problems.append((("custody", i, "at"), "custody_out_of_order", msg, None))
            previous = max(previous, event.at)
        _reject(self, problems)
        return self


# The typed fields, and for each message type which of them it must and may carry. A field a
# type does not name is refused, so a postponement date cannot hide in an acknowledgement.
TYPED_FIELDS = ("reasons", "reason", "until", "conditions", "evidence")
TYPE_FIELDS: dict[MessageType, tuple[frozenset[str], frozenset[str]]] = {
    MessageType.REFUSAL: (frozenset({"reasons"}), frozenset({"reasons"})),
    MessageType.POSTPONEMENT: (frozenset({"reason", "until"}), frozenset({"reason", "until"})),
    MessageType.ACCEPTANCE: (frozenset(), frozenset({"conditions"})),
    MessageType.PARTIAL_RESULT: (frozenset(), frozenset({"evidence"})),
    MessageType.RESULT: (frozenset(), frozenset({"evidence"})),
    MessageType.WITHDRAWAL: (frozenset(), frozenset({"reason"})),
}
_REQUIRED_CODES = {
    (MessageType.REFUSAL, "reasons"): (
        "refusal_reasons_required",
        "a refusal needs at least one reason (UNTOC art. 18(23))",
    ),
    (MessageType.POSTPONEMENT, "reason"): (
        "postponement_reason_required",
        "a postponement needs a reason",
    ),
    (MessageType.POSTPONEMENT, "until"): (
        "postponement_until_required",
        "a postponement needs the date until which execution is postponed",
    ),
}


class MessageDocument(DomainModel):
    schema_version: SchemaVersion = 1
    type: MessageType
    text: LongText
    references: References | None = None
    # refusal: one or more reasons, each with its ground
    reasons: tuple[RefusalReason, ...] = Field(default=(), max_length=20)
    # postponement (required) and withdrawal (optional): why
    reason: Text | None = None
    # postponement: execution is postponed until this date
    until: dt.date | None = None
    # acceptance: terms and conditions of execution (UNTOC 18(26))
    conditions: Text | None = None
    # partial_result, result: the evidence delivered
    evidence: tuple[EvidenceItem, ...] = Field(default=(), max_length=200)

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> Self:
        required, allowed = TYPE_FIELDS.get(self.type, (frozenset(), frozenset()))
        problems: list[tuple[Loc, str, str, object]] = []
        for name in TYPED_FIELDS:
            present = getattr(self, name) not in (None, ())
            if name in required and not present:
                code, msg = _REQUIRED_CODES[(self.type, name)]
                problems.append(((name,), code, msg, None))
            elif present and name not in allowed:
                msg = f"{self.type.with_article} message does not carry {name}"
                problems.append(((name,), "field_not_allowed", msg, None))
        refs = [item.ref for item in self.evidence]
        counts = Counter(refs)
        for i, ref in enumerate(refs):
            if counts[ref] > 1:
                msg = "this ref is used more than once"
                problems.append((("evidence", i, "ref"), "duplicate_ref", msg, ref))
        _reject(self, problems)
        return self

    def attachment_problems(
        self, attachment_sha256: Sequence[str]
    ) -> Iterable[tuple[Loc, str, str, object]]:
        """Evidence that names an attachment must attest that attachment's exact hash."""
        for i, item in enumerate(self.evidence):
            if item.attachment is None:
                continue
            if item.attachment > len(attachment_sha256):
                msg = "no attachment of this message has this index"
                yield ("evidence", i, "attachment"), "unknown_attachment", msg, item.attachment
            elif attachment_sha256[item.attachment - 1] != item.sha256:
                msg = "the attested SHA-256 is not the attachment's"
                yield ("evidence", i, "sha256"), "evidence_hash_mismatch", msg, None

    def date_problems(
        self, *, today: dt.date, latest: dt.datetime
    ) -> Iterable[tuple[Loc, str, str, object]]:
        """Dates this node's officer gives, judged by this node's clock as it seals them:
        a postponement until `today` (UTC) or before ends before it is received, making the
        request overdue at once; evidence obtained after `latest` (now plus the clock skew) is
        not yet obtained. Not for a received message: it was dated by its sender's clock, and
        may arrive days later (retries), so a correct peer can send a date past by then."""
        if self.until is not None and self.until <= today:
            msg = "a postponement lasts until a date after today (UTC)"
            yield ("until",), "postponement_until_past", msg, None
        for i, item in enumerate(self.evidence):
            if item.obtained_at > latest:
                msg = "evidence cannot have been obtained later than now"
                yield ("evidence", i, "obtained_at"), "evidence_in_future", msg, None
            for j, event in enumerate(item.custody):
                if event.at > latest:
                    msg = "a custody event cannot be later than now"
                    yield ("evidence", i, "custody", j, "at"), "custody_in_future", msg, None

    def wire_form(self) -> dict[str, object]:
        """The JSON sealed in an envelope: fields left at their defaults are omitted, so a
        message of a type older nodes know looks to them exactly as it always did."""
        return self.model_dump(mode="json", exclude_defaults=True)
