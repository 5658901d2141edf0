"""Signed delivery receipts: the recipient's proof that it received exactly this envelope.

The sender keeps the receipt forever; it is the non-repudiation-of-receipt evidence. It says
nothing about the request's business state (that is a signed message in the conversation).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nacl.signing import SigningKey

from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    canonical_json,
    format_time,
    is_int,
    load_canonical_object,
    parse_time,
)
from app.crypto.signing import DOMAIN_RECEIPT, sign, verify

RECEIPT_TYPE = "entraide.receipt"
RECEIPT_FIELDS = {
    "v",
    "type",
    "msg_id",
    "envelope_hash",
    "from",
    "to",
    "received_at",
    "status",
    "signer_kid",
    "checkpoint",
}
MAX_RECEIPT_BYTES = 16 * 1024
# How far a receipt's `received_at` may lie outside the time it can have been received in:
# after the envelope was made (its `created_at`) and before the receipt is checked. A
# receiver refuses an envelope created more than its clock skew ahead of its own clock (300 s
# by default, docs/protocol.md section 9 step 21), so a day is far more than any correct
# receiver's clock is off. No bound from `expires_at`: a streamed envelope whose parts were
# all held before it expired may be completed, and receipted, after it.
RECEIPT_TIME_MARGIN = timedelta(hours=24)


class ReceiptError(ValueError):
    """A receipt that is malformed, does not verify, or is for another envelope."""


@dataclass(frozen=True)
class SignedReceipt:
    body: bytes
    signature: bytes

    def to_wire(self) -> dict[str, str]:
        return {"receipt": b64e(self.body), "signature": b64e(self.signature)}


@dataclass(frozen=True)
class Receipt:
    msg_id: str
    envelope_hash: str
    from_authority: str
    to_authority: str
    received_at: datetime
    status: str
    signer_kid: str
    checkpoint: str | None


def check_received_at(receipt: Receipt, *, created_at: datetime, now: datetime) -> Receipt:
    """The one rule on a receipt's time, for the sender that accepts it and for anyone who
    checks a custody proof later (app/crypto/proof.py): within a day of the time between the
    envelope's `created_at` and `now`, the checker's clock. A time outside it is false: a
    receipt is refused, not stored, so it never makes a request look delivered, never breaks
    a custody proof, and never reaches the database (a year 9999 read back in a time zone
    east of UTC is past what the driver reads)."""
    if receipt.received_at < created_at - RECEIPT_TIME_MARGIN:
        raise ReceiptError(
            "the receipt says the envelope was received before it was made "
            f"({format_time(receipt.received_at)}, more than a day before its created_at "
            f"{format_time(created_at)})"
        )
    if receipt.received_at > now + RECEIPT_TIME_MARGIN:
        raise ReceiptError(
            "the receipt says the envelope was received in the future "
            f"({format_time(receipt.received_at)}, more than a day after the time it is checked)"
        )
    return receipt


def issue_receipt(
    signing_key: SigningKey,
    *,
    signer_kid: str,
    msg_id: str,
    envelope_hash: str,
    from_authority: str,
    to_authority: str,
    received_at: datetime,
    checkpoint: str | None,
) -> SignedReceipt:
    body = canonical_json(
        {
            "v": 1,
            "type": RECEIPT_TYPE,
            "msg_id": msg_id,
            "envelope_hash": envelope_hash,
            "from": from_authority,
            "to": to_authority,
            "received_at": format_time(received_at),
            "status": "accepted",
            "signer_kid": signer_kid,
            "checkpoint": checkpoint,
        }
    )
    return SignedReceipt(body=body, signature=sign(signing_key, DOMAIN_RECEIPT, body))


def decode_receipt(wire: object) -> SignedReceipt:
    if not isinstance(wire, dict) or set(wire) != {"receipt", "signature"}:
        raise ReceiptError("a receipt is an object with exactly 'receipt' and 'signature'")
    try:
        body = b64d(wire["receipt"])
        signature = b64d(wire["signature"], length=64)
    except DecodeError as exc:
        raise ReceiptError(f"malformed receipt: {exc}") from exc
    if len(body) > MAX_RECEIPT_BYTES:
        raise ReceiptError("receipt too large")
    return SignedReceipt(body=body, signature=signature)


def _checkpoint(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ReceiptError("the receipt's checkpoint must be a signed note or null")


def verify_receipt(
    signed: SignedReceipt,
    *,
    signer_public: bytes,
    signer_kid: str | None = None,
    msg_id: str,
    envelope_hash: str,
    from_authority: str,
    to_authority: str,
) -> Receipt:
    """Check the signature, then that the receipt is for exactly the envelope we sent."""
    if not verify(signer_public, DOMAIN_RECEIPT, signed.body, signed.signature):
        raise ReceiptError("receipt signature does not verify")
    return check_statement(
        signed,
        signer_kid=signer_kid,
        msg_id=msg_id,
        envelope_hash=envelope_hash,
        from_authority=from_authority,
        to_authority=to_authority,
    )


def check_statement(
    signed: SignedReceipt,
    *,
    signer_kid: str | None = None,
    msg_id: str,
    envelope_hash: str,
    from_authority: str,
    to_authority: str,
) -> Receipt:
    """The statement alone, its signature NOT checked: that it is a version 1 receipt of
    acceptance for exactly this envelope. `verify_receipt` checks the signature first."""
    try:
        body: dict[str, Any] = load_canonical_object(signed.body)
        if set(body) != RECEIPT_FIELDS or not is_int(body["v"]) or body["v"] != 1:
            raise ReceiptError("not a version 1 receipt")
        text_fields = ("type", "msg_id", "envelope_hash", "from", "to", "status", "signer_kid")
        if body["type"] != RECEIPT_TYPE or not all(isinstance(body[k], str) for k in text_fields):
            raise ReceiptError("not a version 1 receipt")
        receipt = Receipt(
            msg_id=str(body["msg_id"]),
            envelope_hash=str(body["envelope_hash"]),
            from_authority=str(body["from"]),
            to_authority=str(body["to"]),
            received_at=parse_time(body["received_at"]),
            status=str(body["status"]),
            signer_kid=str(body["signer_kid"]),
            checkpoint=_checkpoint(body["checkpoint"]),
        )
    except DecodeError as exc:
        raise ReceiptError(f"malformed receipt: {exc}") from exc
    matches = (
        hmac.compare_digest(receipt.msg_id.encode(), msg_id.encode())
        and hmac.compare_digest(receipt.envelope_hash.encode(), envelope_hash.encode())
        and receipt.from_authority == from_authority
        and receipt.to_authority == to_authority
        and receipt.status == "accepted"
        and (signer_kid is None or receipt.signer_kid == signer_kid)
    )
    if not matches:
        raise ReceiptError("receipt is not for the envelope that was sent")
    return receipt
