"""Custody proofs: what was sent and received, checkable by anyone, offline, without a node.

A proof is one JSON document for one message: the envelope's header bytes and the sender's
signature over them, the receiver's signed receipt for exactly that header, both signers'
public keys, part 0 (the inner manifest, as the header lists it: length and SHA-256) and the
envelope's content key. Checking it (`verify_proof`, `entraide proof verify`):

1. the sender's signature over the header (domain-separated, DESIGN.md section 4);
2. the key commitment in the signed header against the content key: the key cannot be one
   chosen afterwards to open part 0 to another text (secretstream alone commits to no key);
3. part 0 against the header (length, SHA-256), then opened under its part key: the manifest,
   bound to the header (message, sender, addressee, conversation), lists each attachment's
   name, size and plaintext SHA-256, and carries the request's document; neither it nor its
   content has a member the protocol does not define, as a receiver refuses (one would be
   attested yet shown to no reader);
4. the receiver's signature over the receipt, and the receipt's statement: this message id,
   this header's hash (the envelope hash), these two authorities;
5. the receipt's time, by the rule the sender applied when it accepted the receipt
   (`receipts.check_received_at`): at most a day before the header's `created_at`, at most a
   day ahead of the checker's clock.

So a file whose SHA-256 is an attachment's is what the sender signed for and the receiver
signed as received. What the proof cannot say is whose keys these are: the reader compares
the key ids it prints with those each authority publishes (`entraide keys show`), out of band.
The content key opens the whole envelope: a proof is handled as the request itself.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.crypto import envelope as env
from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    is_int,
    key_id,
    load_canonical_object,
    utc_now,
)
from app.crypto.receipts import ReceiptError, SignedReceipt, check_received_at, verify_receipt
from app.crypto.signing import DOMAIN_ENVELOPE, verify

PROOF_TYPE = "entraide.custody-proof"
PROOF_VERSION = 1
FIELDS = {
    "v",
    "type",
    "header",
    "signature",
    "sender_key",
    "manifest_part",
    "content_key",
    "receipt",
    "receipt_signature",
    "receiver_key",
}
MAX_PROOF_BYTES = 8 * 1024 * 1024


class ProofError(ValueError):
    """A proof that is malformed or fails a check: the message says which, in plain words."""


@dataclass(frozen=True)
class Attachment:
    index: int
    name: str
    media_type: str
    size: int
    sha256: str


@dataclass(frozen=True)
class VerifiedProof:
    msg_id: str
    envelope_hash: str
    sender: str
    sender_kid: str
    sender_key: bytes
    receiver: str
    receiver_kid: str
    receiver_key: bytes
    created_at: datetime
    received_at: datetime
    document: dict[str, Any]
    attachments: list[Attachment]

    def attachment_matches(self, index: int, data_sha256: str) -> bool:
        listed = next((item for item in self.attachments if item.index == index), None)
        return listed is not None and hmac.compare_digest(listed.sha256, data_sha256)


def build_proof(
    *,
    header: bytes,
    signature: bytes,
    sender_key: bytes,
    manifest_part: bytes,
    content_key: bytes,
    receipt: SignedReceipt,
    receiver_key: bytes,
) -> dict[str, Any]:
    return {
        "v": PROOF_VERSION,
        "type": PROOF_TYPE,
        "header": b64e(header),
        "signature": b64e(signature),
        "sender_key": b64e(sender_key),
        "manifest_part": b64e(manifest_part),
        "content_key": b64e(content_key),
        "receipt": b64e(receipt.body),
        "receipt_signature": b64e(receipt.signature),
        "receiver_key": b64e(receiver_key),
    }


def _field(document: dict[str, Any], name: str, length: int | None = None) -> bytes:
    value = document[name]
    if not isinstance(value, str):
        raise ProofError(f"'{name}' must be base64 text")
    try:
        data = b64d(value, length=length)
    except DecodeError as exc:
        raise ProofError(f"'{name}' is not valid base64: {exc}") from exc
    if b64e(data) != value:  # one spelling per value: a proof is not malleable
        raise ProofError(f"'{name}' is not in canonical base64")
    return data


def _content_members(content: dict[str, Any], *, earlier_rules: bool) -> bool:
    if earlier_rules:
        return env.CONTENT_FIELDS <= content.keys()
    return content.keys() == env.CONTENT_FIELDS


def verify_proof(
    document: object, *, now: datetime | None = None, earlier_rules: bool = False
) -> VerifiedProof:
    """Every check of the module's docstring, in order; the first that fails is raised.
    `now` is the checker's clock (the current time unless given).

    `earlier_rules`: only for a node telling its own stored rows apart, never for a proof
    handed out: without the checks added on 2026-11-29 (no member beyond the protocol's in
    the manifest or its content, the receipt's time within a day), which messages and
    receipts accepted before then may fail although nothing was altered."""
    if not isinstance(document, dict) or set(document) != FIELDS:
        raise ProofError(f"a custody proof is an object with exactly {sorted(FIELDS)}")
    if (
        not is_int(document["v"])
        or document["v"] != PROOF_VERSION
        or document["type"] != PROOF_TYPE
    ):
        raise ProofError("not a version 1 Entraide custody proof")
    header_bytes = _field(document, "header")
    sender_key = _field(document, "sender_key", 32)
    receiver_key = _field(document, "receiver_key", 32)
    content_key = _field(document, "content_key", env.KEY_BYTES)
    manifest_part = _field(document, "manifest_part")
    if hmac.compare_digest(sender_key, receiver_key):
        raise ProofError("the receipt is signed with the sender's own key, not a receiver's")
    if not verify(sender_key, DOMAIN_ENVELOPE, header_bytes, _field(document, "signature", 64)):
        raise ProofError("the sender's signature over the header does not verify")
    try:
        declared = load_canonical_object(header_bytes).get("parts")
        header = env.parse_header(header_bytes, len(declared) if isinstance(declared, list) else 0)
    except (DecodeError, env.EnvelopeError) as exc:
        raise ProofError(f"the header is not a version 1 envelope header: {exc}") from exc
    if not header.parts:
        raise ProofError("the header lists no part 0 (the manifest)")
    if header.from_sig_kid != key_id(sender_key):
        raise ProofError("the header names another signing key than the sender key given")
    try:
        env.check_commitment(header, content_key)
    except env.EnvelopeError as exc:
        raise ProofError("the content key is not the one the signed header commits to") from exc
    try:
        manifest = env.open_manifest_part(header, manifest_part, content_key, stored=earlier_rules)
    except env.EnvelopeError as exc:
        raise ProofError(f"part 0 is not this envelope's manifest ({exc.code}): {exc}") from exc
    content = manifest["content"]
    if (
        not isinstance(content, dict)
        or not _content_members(content, earlier_rules=earlier_rules)
        or content["kind"] not in ("request", "message")
        or not isinstance(content["document"], dict)
    ):
        raise ProofError(
            "the manifest's content is not a version 1 message: an object with exactly "
            "'kind' (request or message) and 'document' (an object)"
        )
    envelope_hash = hashlib.sha256(header_bytes).hexdigest()
    signed = SignedReceipt(
        body=_field(document, "receipt"), signature=_field(document, "receipt_signature", 64)
    )
    try:
        receipt = verify_receipt(
            signed,
            signer_public=receiver_key,
            signer_kid=key_id(receiver_key),
            msg_id=header.msg_id,
            envelope_hash=envelope_hash,
            from_authority=header.from_authority,
            to_authority=header.to_authority,
        )
    except ReceiptError as exc:
        raise ProofError(f"the receipt is not the receiver's for this envelope: {exc}") from exc
    try:
        if not earlier_rules:
            check_received_at(
                receipt, created_at=header.created_at, now=utc_now() if now is None else now
            )
    except ReceiptError as exc:
        raise ProofError(str(exc)) from exc
    return VerifiedProof(
        msg_id=header.msg_id,
        envelope_hash=envelope_hash,
        sender=header.from_authority,
        sender_kid=header.from_sig_kid,
        sender_key=sender_key,
        receiver=header.to_authority,
        receiver_kid=receipt.signer_kid,
        receiver_key=receiver_key,
        created_at=header.created_at,
        received_at=receipt.received_at,
        document=content["document"],
        attachments=[
            Attachment(
                index=entry["index"],
                name=entry["name"],
                media_type=entry["media_type"],
                size=entry["size"],
                sha256=entry["sha256"],
            )
            for entry in manifest["attachments"]
        ],
    )
