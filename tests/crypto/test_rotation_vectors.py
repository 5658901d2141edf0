"""The key rotation vector (docs/protocol.md §5.4, §12): the code reproduces it, and a peer
that pinned FR's original key follows it to the new keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto.encoding import b64d, sha256
from app.crypto.identity import parse_identity_document
from app.crypto.rotation import make_rotation, parse_rotation
from app.crypto.signing import DOMAIN_ROTATION
from app.migrate import ROOT

VECTORS = json.loads((ROOT / "tests" / "vectors" / "envelope-v1.json").read_text())
ROTATION = VECTORS["rotation"]
FR = VECTORS["nodes"]["FR"]


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_code_reproduces_the_rotation_statement() -> None:
    rotation = make_rotation(
        authority_id=FR["authority_id"],
        seq=1,
        old_signing=SigningKey(bytes.fromhex(FR["signing"]["seed_hex"])),
        old_encryption=PrivateKey(bytes.fromhex(FR["encryption"]["secret_key_hex"])),
        new_signing=SigningKey(bytes.fromhex(ROTATION["new_signing"]["seed_hex"])),
        new_encryption=PrivateKey(bytes.fromhex(ROTATION["new_encryption"]["secret_key_hex"])),
        rotated_at=_time(ROTATION["rotated_at"]),
        accepted_until=_time(ROTATION["old_encryption_accepted_until"]),
    )
    assert rotation.statement.decode() == ROTATION["statement_text"]
    assert rotation.to_wire() == ROTATION["wire"]
    message = DOMAIN_ROTATION + sha256(rotation.statement)
    assert message.hex() == ROTATION["signature_message_hex"]
    assert VECTORS["constants"]["domain_rotation_hex"] == DOMAIN_ROTATION.hex()


def test_a_peer_that_pinned_the_old_key_follows_the_chain() -> None:
    identity = parse_identity_document(ROTATION["identity"]["wire"])
    assert (
        b64d(ROTATION["identity"]["wire"]["document"]).decode()
        == (ROTATION["identity"]["document_text"])
    )
    pinned = bytes.fromhex(FR["signing"]["public_key_hex"])
    path = identity.rotation_path(pinned)
    assert path is not None
    assert [link.new.signing_kid for link in path] == [ROTATION["new_signing"]["kid"]]
    assert identity.signing.kid == ROTATION["new_signing"]["kid"]
    assert identity.encryption.kid == ROTATION["new_encryption"]["kid"]
    assert identity.log.kid == FR["log"]["kid"]
    assert parse_rotation(ROTATION["wire"]).old.signing == pinned
