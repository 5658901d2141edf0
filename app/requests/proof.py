"""A custody proof of one stored message, for an auditor or a court (app/crypto/proof.py).

Either side can make one once the receipt is stored: the sender from its sealed copy (its own
key wrap) and the receiver's receipt it keeps; the receiver from what it received and the
receipt it issued. Building it opens the envelope's content key, so it is an authorised read
like any other, audited (`proof.exported`). The proof is checked before it leaves the node: a
row altered in the database gives 500 `stored_envelope_corrupt`, never a proof that fails
later in front of a court.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.log import record
from app.auth.service import Principal
from app.crypto import envelope as env
from app.crypto.proof import ProofError, build_proof, verify_proof
from app.crypto.receipts import SignedReceipt
from app.errors import Conflict, StoredEnvelopeCorrupt
from app.evidence.inbound import _declared_parts
from app.models import Message, Receipt
from app.node import Node
from app.peers.keys import stored_envelope_signer, stored_receipt_signer
from app.requests.service import OUTBOUND, actor_of, message_of, visible_case
from app.requests.store import load_envelope

ACTION = "proof.exported"


def custody_proof(
    session: Session, node: Node, *, request_id: str, msg_id: str, principal: Principal
) -> dict[str, Any]:
    case = visible_case(session, request_id, principal)
    message = message_of(session, case, msg_id)
    stored = session.scalar(select(Receipt).where(Receipt.message_id == message.id))
    if stored is None:
        raise Conflict(
            "this message has no receipt yet: a proof needs the receiver's signed receipt",
            code="no_receipt",
        )
    outbound = message.direction == OUTBOUND
    proof = _proof(session, node, message, stored, outbound=outbound)
    try:
        checked = verify_proof(proof)
    except ProofError as exc:
        try:
            verify_proof(proof, earlier_rules=True)
        except ProofError:
            raise _corrupt(message, str(exc)) from exc
        # Intact, but accepted before the checks a proof's reader now applies: a proof that
        # fails in front of its reader is not given, and no tampering is alleged (this was
        # 500 stored_envelope_corrupt, from review).
        raise Conflict(
            "no custody proof can be given for this message: it was accepted before "
            f"2026-11-29 and would fail today's checks ({exc}); its stored rows are intact",
            code="not_provable",
        ) from exc
    record(
        session,
        actor=actor_of(principal),
        action=ACTION,
        request_id=case.id,
        msg_id=message.msg_id,
        peer=case.peer_authority,
        details={"envelope_hash": checked.envelope_hash, "attachments": len(checked.attachments)},
    )
    return proof


def _proof(
    session: Session, node: Node, message: Message, stored: Receipt, *, outbound: bool
) -> dict[str, Any]:
    head = load_envelope(session, message)  # the header, its signature, part 0 (at least)
    try:
        count = _declared_parts(head.header)
        header = env.parse_header(head.header, count)
        # Ours is the sender's own wrap or the addressee's, under a current or retired key.
        kid = next(
            (
                k
                for k in (header.to_enc_kid, header.from_enc_kid)
                if node.keys.encryption_key_for(k)
            ),
            header.to_enc_kid,
        )
        content_key = env.unwrap_content_key(header, node.keys, kid=kid)
    except env.EnvelopeError as exc:
        raise _corrupt(message, f"it does not open ({exc.code})") from exc
    sender_key = stored_envelope_signer(
        session,
        node.keys,
        outbound=outbound,
        sender=message.sender_authority,
        header=head.header,
        parts=count,
    )
    peer = message.recipient_authority if outbound else message.sender_authority
    receiver_key = stored_receipt_signer(
        session, node.keys, outbound=outbound, peer=peer, kid=stored.signer_kid
    )
    if sender_key is None or receiver_key is None or not head.parts:
        raise _corrupt(message, "a signer's key or part 0 is no longer known")
    return build_proof(
        header=head.header,
        signature=head.signature,
        sender_key=sender_key,
        manifest_part=head.parts[0],
        content_key=content_key,
        receipt=SignedReceipt(body=stored.body, signature=stored.signature),
        receiver_key=receiver_key,
    )


def _corrupt(message: Message, problem: str) -> StoredEnvelopeCorrupt:
    corrupt = StoredEnvelopeCorrupt(
        f"stored message {message.msg_id}: {problem}; storage was altered or damaged"
    )
    corrupt.audit = {
        "actor": "node",
        "action": ACTION,
        "outcome": StoredEnvelopeCorrupt.code,
        "request_id": message.request_id,
        "msg_id": message.msg_id,
        "details": {"detail": problem[:200]},
    }
    return corrupt
