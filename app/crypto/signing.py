"""Ed25519 signatures with explicit domain separation.

Every signature is over `DOMAIN || SHA-256(exact bytes)`. The domain string stops a
signature made for one purpose (a receipt) from being replayed as another (an envelope).
"""

from __future__ import annotations

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from app.crypto.encoding import sha256

DOMAIN_ENVELOPE = b"entraide/v1/envelope-header\x00"
DOMAIN_RECEIPT = b"entraide/v1/receipt\x00"
DOMAIN_IDENTITY = b"entraide/v1/node-identity\x00"
DOMAIN_ROTATION = b"entraide/v1/key-rotation\x00"
DOMAIN_PART_PUT = b"entraide/v1/part-put\x00"
DOMAIN_RECOVERY = b"entraide/v1/recovery-request\x00"

SIGNATURE_BYTES = 64


def sign(key: SigningKey, domain: bytes, data: bytes) -> bytes:
    return bytes(key.sign(domain + sha256(data)).signature)


def verify(public_key: bytes, domain: bytes, data: bytes, signature: bytes) -> bool:
    if len(signature) != SIGNATURE_BYTES or len(public_key) != 32:
        return False
    try:
        VerifyKey(public_key).verify(domain + sha256(data), signature)
    except BadSignatureError:
        return False
    return True
