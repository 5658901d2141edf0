"""Custody proofs (app/crypto/proof.py): one checks out, and each way of forging or altering
one is refused, naming the check that failed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.crypto import envelope as env
from app.crypto.encoding import b64d, b64e, canonical_json, sha256_hex
from app.crypto.proof import ProofError, build_proof, verify_proof
from app.crypto.receipts import issue_receipt
from app.crypto.signing import DOMAIN_ENVELOPE, sign
from tests.crypto.forge import reseal_manifest
from tests.crypto.test_envelope import NOW, Node, data, de, fr, it, seal

FILES = [data(3000), b"", data(1)]
# What a node puts in a manifest (docs/domain.md); the receiver refuses any other member.
CONTENT = {"kind": "request", "document": {"summary": "relevés bancaires"}}


def _proof(
    sender: Node | None = None,
    receiver: Node | None = None,
    change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """`change`: the manifest as the sender's keys could forge it (tests/crypto/forge.py)."""
    sender, receiver = sender or fr(), receiver or de()
    wire = seal(sender, receiver, attachments=FILES, content=CONTENT)
    if change is not None:
        wire = reseal_manifest(wire, sender.keys, change)
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


def _receipt_of(proof: dict[str, Any], signer: Node, **changes: Any) -> None:
    """The receipt replaced by one `signer` signs for this very envelope."""
    statement = json.loads(b64d(proof["receipt"]))
    arguments: dict[str, Any] = {
        "signer_kid": signer.keys.signing_kid,
        "msg_id": statement["msg_id"],
        "envelope_hash": statement["envelope_hash"],
        "from_authority": statement["from"],
        "to_authority": statement["to"],
        "received_at": NOW,
        "checkpoint": None,
    }
    arguments.update(changes)
    forged = issue_receipt(signer.keys.signing, **arguments)
    proof["receipt"], proof["receipt_signature"] = b64e(forged.body), b64e(forged.signature)


def _forged_by_the_sender(proof: dict[str, Any]) -> None:
    """The sender signs a receipt of its own for this envelope, and gives its own key as the
    receiver's (from review: it verified)."""
    _receipt_of(proof, fr())
    proof["receiver_key"] = proof["sender_key"]


def _received_before_it_was_made(proof: dict[str, Any]) -> None:
    _receipt_of(proof, de(), received_at=NOW - timedelta(days=2))


def _received_in_the_future(proof: dict[str, Any]) -> None:
    """A receipt dated 9999: a sender refuses it (receipts.check_received_at), so a proof
    that carries one was not made from what a sender accepted."""
    _receipt_of(proof, de(), received_at=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))


def _another_spelling(proof: dict[str, Any]) -> None:
    """The same signature bytes, with the last base64 digit's unused bits set."""
    text = proof["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = text[-3]
    proof["signature"] = text[:-3] + alphabet[alphabet.index(last) ^ 1] + "=="


def _another_content_key(proof: dict[str, Any]) -> None:
    proof["content_key"] = b64e(bytes(32))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_flip("header"), "sender's signature over the header does not verify"),
        (_flip("signature"), "sender's signature over the header does not verify"),
        (_other_key("sender_key", it), "sender's signature over the header does not verify"),
        (_another_content_key, "not the one the signed header commits to"),
        (_flip("manifest_part"), "part 0 is not this envelope's manifest"),
        (_other_receipt, "the receipt is not the receiver's for this envelope"),
        (_flip("receipt"), "the receipt is not the receiver's for this envelope"),
        (_flip("receipt_signature"), "the receipt is not the receiver's for this envelope"),
        (_other_key("receiver_key", it), "the receipt is not the receiver's for this envelope"),
        (_forged_by_the_sender, "signed with the sender's own key"),
        (_received_before_it_was_made, "received before it was made"),
        (_received_in_the_future, "received in the future"),
        (_another_spelling, "not in canonical base64"),
    ],
)
def test_an_altered_or_forged_proof_is_refused(
    change: Callable[[dict[str, Any]], None], says: str
) -> None:
    proof = _proof()
    change(proof)
    with pytest.raises(ProofError, match=says):
        verify_proof(proof)


def test_a_header_without_parts_is_refused_not_a_crash() -> None:
    proof = _proof()
    header = json.loads(b64d(proof["header"]))
    header["parts"] = []
    raw = canonical_json(header)
    proof["header"] = b64e(raw)
    proof["signature"] = b64e(sign(fr().keys.signing, DOMAIN_ENVELOPE, raw))
    with pytest.raises(ProofError, match=r"no part 0|not a version 1 envelope header"):
        verify_proof(proof)


@pytest.mark.parametrize(
    "document",
    [None, [], {}, {"v": 1}, {**dict.fromkeys(range(3))}, "proof", {"v": True}],
)
def test_what_is_no_proof_is_refused_in_plain_words(document: object) -> None:
    with pytest.raises(ProofError, match="custody proof"):
        verify_proof(document)


def _content(**changes: object) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        manifest["content"] = {**manifest["content"], **changes}

    return change


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda m: m.update(note="HIDDEN-NOTE"), r"part 0 is not this envelope's manifest"),
        (lambda m: m.pop("in_reply_to"), r"part 0 is not this envelope's manifest"),
        (_content(annex="HIDDEN-ANNEX"), "content is not a version 1 message"),
        (lambda m: m["content"].pop("document"), "content is not a version 1 message"),
        (_content(kind="reply"), "content is not a version 1 message"),
        (_content(document=["a list"]), "content is not a version 1 message"),
        (lambda m: m.update(content="text"), "content is not a version 1 message"),
    ],
    ids=["manifest-extra", "no-in_reply_to", "content-extra", "no-document", "kind", "list", "str"],
)
def test_a_proof_of_what_a_receiver_refuses_is_refused(
    change: Callable[[dict[str, Any]], None], says: str
) -> None:
    """A member no schema defines would be attested by the receipt yet shown to no reader:
    the receiver refuses it (docs/protocol.md §9), and so does a proof's reader, whose
    receipt a receiver that did not check could have signed (from review)."""
    proof = _proof(change=change)
    with pytest.raises(ProofError, match=says) as caught:
        verify_proof(proof)
    assert "HIDDEN" not in str(caught.value)
