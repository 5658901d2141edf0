"""Custody proofs (app/crypto/proof.py): one checks out, and each way of forging or altering
one is refused, naming the check that failed."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest

from app.crypto import envelope as env
from app.crypto.encoding import b64d, b64e, sha256_hex
from app.crypto.proof import ProofError, build_proof, verify_proof
from app.crypto.receipts import issue_receipt
from tests.crypto.test_envelope import NOW, Node, data, de, fr, it, seal

FILES = [data(3000), b"", data(1)]


def _proof(sender: Node | None = None, receiver: Node | None = None) -> dict[str, Any]:
    sender, receiver = sender or fr(), receiver or de()
    wire = seal(sender, receiver, attachments=FILES)
    header = env.parse_header(wire.header, len(wire.parts))
    content_key = env.unwrap_content_key(header, sender.keys, kid=header.from_enc_kid)
    receipt = issue_receipt(
        receiver.keys.signing,
        signer_kid=receiver.keys.signing_kid,
        msg_id=header.msg_id,
        envelope_hash=sha256_hex(wire.header),
        from_authority=sender.authority,
        to_authority=receiver.authority,
        received_at=NOW,
        checkpoint=None,
    )
    return build_proof(
        header=wire.header,
        signature=wire.signature,
        sender_key=sender.keys.signing_public,
        manifest_part=wire.parts[0],
        content_key=content_key,
        receipt=receipt,
        receiver_key=receiver.keys.signing_public,
    )


def test_a_proof_shows_what_was_sent_and_received() -> None:
    checked = verify_proof(_proof())
    assert (checked.sender, checked.receiver) == ("FR/MJ", "DE/BFJ")
    assert (checked.sender_kid, checked.receiver_kid) == (
        fr().keys.signing_kid,
        de().keys.signing_kid,
    )
    assert checked.received_at == NOW
    assert [(a.index, a.size) for a in checked.attachments] == [(1, 3000), (2, 0), (3, 1)]
    for index, item in enumerate(FILES, 1):
        assert checked.attachment_matches(index, hashlib.sha256(item).hexdigest())
    assert not checked.attachment_matches(1, hashlib.sha256(FILES[2]).hexdigest())
    assert not checked.attachment_matches(4, hashlib.sha256(FILES[0]).hexdigest())


def _flip(field: str, at: int = 40) -> Callable[[dict[str, Any]], None]:
    def change(proof: dict[str, Any]) -> None:
        raw = bytearray(b64d(proof[field]))
        raw[at % len(raw)] ^= 1
        proof[field] = b64e(bytes(raw))

    return change


def _other_receipt(proof: dict[str, Any]) -> None:
    other = _proof()  # another envelope, the same two nodes: a receipt for something else
    proof["receipt"], proof["receipt_signature"] = other["receipt"], other["receipt_signature"]


def _other_key(field: str, node: Callable[[], Node]) -> Callable[[dict[str, Any]], None]:
    def change(proof: dict[str, Any]) -> None:
        proof[field] = b64e(node().keys.signing_public)

    return change


def _forged_by_the_sender(proof: dict[str, Any]) -> None:
    """The sender signs a receipt of its own: it is not the receiver's key."""
    forged = _proof(fr(), it())
    proof["receipt"], proof["receipt_signature"] = forged["receipt"], forged["receipt_signature"]


def _another_content_key(proof: dict[str, Any]) -> None:
    proof["content_key"] = b64e(bytes(32))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_flip("header"), "sender's signature over the header does not verify"),
        (_flip("signature"), "sender's signature over the header does not verify"),
        (_other_key("sender_key", it), "sender's signature over the header does not verify"),
        (_another_content_key, "not the one the signed header commits to"),
        (_flip("manifest_part"), "part 0 is not the one the signed header lists"),
        (_other_receipt, "the receipt is not the receiver's for this envelope"),
        (_flip("receipt"), "the receipt is not the receiver's for this envelope"),
        (_flip("receipt_signature"), "the receipt is not the receiver's for this envelope"),
        (_other_key("receiver_key", it), "the receipt is not the receiver's for this envelope"),
        (_forged_by_the_sender, "the receipt is not the receiver's for this envelope"),
    ],
)
def test_an_altered_or_forged_proof_is_refused(
    change: Callable[[dict[str, Any]], None], says: str
) -> None:
    proof = _proof()
    change(proof)
    with pytest.raises(ProofError, match=says):
        verify_proof(proof)


@pytest.mark.parametrize(
    "document",
    [None, [], {}, {"v": 1}, {**dict.fromkeys(range(3))}, "proof"],
)
def test_what_is_no_proof_is_refused_in_plain_words(document: object) -> None:
    with pytest.raises(ProofError, match="custody proof"):
        verify_proof(document)
