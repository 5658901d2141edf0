"""A repeat of an envelope this node holds is always answered with its stored receipt; the
first few repeats of a message are audited one by one, the rest counted (from review: anyone
holding a copy could grow the audit log without end, one entry per repeat)."""

from __future__ import annotations

from app.crypto.envelope import WireEnvelope
from app.p2p.service import REPEATS_AUDITED
from tests.requests.conftest import Harness, example_document


def _envelope(ar: Harness) -> WireEnvelope:
    return ar._seal({"kind": "request", "document": example_document()}, None, None)


def test_repeats_are_answered_always_and_audited_up_to_a_limit(fresh_ar: Harness) -> None:
    ar = fresh_ar
    envelope = _envelope(ar)
    first = ar.post_envelope(envelope)
    assert first.status_code == 201, first.text
    answers = [ar.post_envelope(envelope) for _ in range(REPEATS_AUDITED + 5)]
    assert {answer.status_code for answer in answers} == {200}
    assert all(answer.json() == first.json() for answer in answers)  # the same receipt
    assert len(ar.audit("envelope.repeated")) == REPEATS_AUDITED
    (counted,) = ar.audit("auth.throttled")
    assert counted[0] == "peer:ES/MJ"
    # Another message's repeats have their own count.
    other = _envelope(ar)
    assert ar.post_envelope(other).status_code == 201
    assert ar.post_envelope(other).status_code == 200
    assert len(ar.audit("envelope.repeated")) == REPEATS_AUDITED + 1
