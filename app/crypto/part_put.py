"""The signature a streamed part's PUT carries (docs/protocol.md section 8.5).

A part's bytes authenticate themselves (each chunk opens only with the content key), but
anyone who learns a transfer's msg_id (it is in every part URL, so in access logs) could
otherwise occupy the part: trickle a body to hold it busy, or send bad chunks. The sender
signs where its PUT starts, so a receiver takes a part's body from the sender alone.
"""

from __future__ import annotations

from nacl.signing import SigningKey

from app.crypto.encoding import DecodeError, b64d, b64e
from app.crypto.signing import DOMAIN_PART_PUT, SIGNATURE_BYTES, sign, verify

HEADER = "entraide-part-signature"


def part_put_data(envelope_hash: str, index: int, offset: int) -> bytes:
    """What is signed: the envelope (its hash names the sender, recipient and every part),
    the part and the offset its body starts at, as ASCII `hash/index/offset`."""
    return f"{envelope_hash}/{index}/{offset}".encode("ascii")


def sign_part_put(key: SigningKey, envelope_hash: str, index: int, offset: int) -> str:
    return b64e(sign(key, DOMAIN_PART_PUT, part_put_data(envelope_hash, index, offset)))


def part_put_signed(
    public_keys: list[bytes], envelope_hash: str, index: int, offset: int, value: str | None
) -> bool:
    """Whether `value` (the header as received, or None) is a signature of this PUT by one
    of `public_keys`."""
    if value is None:
        return False
    try:
        signature = b64d(value, length=SIGNATURE_BYTES)
    except DecodeError:
        return False
    data = part_put_data(envelope_hash, index, offset)
    return any(verify(key, DOMAIN_PART_PUT, data, signature) for key in public_keys)
