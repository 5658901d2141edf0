"""Envelopes forged with a sender's own keys, for tests of what the receiver refuses inside
the ciphertext: every check before the manifest's passes, as it would for a hostile peer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from app.crypto import envelope as env
from app.crypto.encoding import b64e, canonical_json, sha256_hex
from app.crypto.keys import NodeKeys
from app.crypto.signing import DOMAIN_ENVELOPE, sign


def reseal_manifest(
    envelope: env.WireEnvelope, keys: NodeKeys, change: Callable[[dict[str, Any]], None]
) -> env.WireEnvelope:
    """Part 0 opened with the sender's own key wrap, its manifest changed by `change`, sealed
    again and described in the header, which the sender's signing key signs again."""
    header = env.parse_header(envelope.header, len(envelope.parts))
    content_key = env.unwrap_content_key(header, keys, kid=header.from_enc_kid)
    key = env.part_key(content_key, header.msg_id_bytes, 0)
    ad = env.part_ad(header.msg_id_bytes, 0)
    manifest = json.loads(
        env.decrypt_part(envelope.parts[0], key, ad, header.parts[0].stream_header)
    )
    change(manifest)
    stream_header, cipher = env.encrypt_part(canonical_json(manifest), key, ad, None)
    body = json.loads(envelope.header)
    body["parts"][0].update(
        stream_header=b64e(stream_header), length=len(cipher), sha256=sha256_hex(cipher)
    )
    raw = canonical_json(body)
    signature = sign(keys.signing, DOMAIN_ENVELOPE, raw)
    return env.WireEnvelope(raw, signature, [cipher, *envelope.parts[1:]])
