"""One audit entry proven offline: its bytes, its inclusion proof, a checkpoint the log key signed.

What a court asks about ("who read this request?") is one entry, and the whole export is
millions. The node answers `GET /api/v1/audit/proofs/inclusion` with the entry's bytes as
stored beside the proof; `entraide audit check-entry` checks them against a checkpoint note
and the log's verifier key, with no node, database or key of the reader's: the note's
signature, the proof's size against the note's, and the proof from the entry's own leaf hash
(RFC 6962) to the note's root. An entry rebuilt from its parsed fields could differ from the
bytes the log holds by a space or an escape, and fail; the bytes themselves cannot.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from app.audit.merkle import leaf_hash, verify_inclusion
from app.audit.note import Checkpoint, NoteError, Verifier, open_note


class EntryProofError(ValueError):
    """The proof does not show the entry in the signed log; the message says why."""


@dataclass(frozen=True)
class ProvenEntry:
    index: int
    size: int  # the signed checkpoint's
    entry: dict[str, Any]


def check_entry(proof: object, note: str, verifier: Verifier) -> ProvenEntry:
    """The entry the proof carries, if it is entry `index` of the log `note` signs."""
    if not isinstance(proof, dict):
        raise EntryProofError("not an inclusion proof (a JSON object)")
    index, size, hashes = proof.get("index"), proof.get("tree_size"), proof.get("proof")
    encoded = proof.get("entry_base64")
    if type(index) is not int or type(size) is not int or not isinstance(hashes, list):
        raise EntryProofError("not an inclusion proof (index, tree_size, proof)")
    if not isinstance(encoded, str):
        raise EntryProofError("the proof carries no entry_base64 (a node before 2026-11-30)")
    try:
        path = [bytes.fromhex(item) for item in hashes]
        data = base64.b64decode(encoded, validate=True)
    except (TypeError, ValueError, binascii.Error) as exc:
        raise EntryProofError(f"the proof's hashes or entry do not decode: {exc}") from exc
    try:
        text, _ = open_note(note, [verifier])
        checkpoint = Checkpoint.parse(text)
    except NoteError as exc:
        raise EntryProofError(f"the checkpoint does not verify with the log key: {exc}") from exc
    if checkpoint.origin != verifier.name:
        raise EntryProofError(f"the checkpoint is of log {checkpoint.origin}")
    if checkpoint.size != size:
        raise EntryProofError(
            f"the proof is for a log of {size} entries, the checkpoint covers "
            f"{checkpoint.size}: ask for the proof with size={checkpoint.size}"
        )
    if not verify_inclusion(leaf_hash(data), index, size, path, checkpoint.root_hash):
        raise EntryProofError(
            f"entry {index} as given is not in the log the checkpoint signs (its bytes or the "
            "proof were changed)"
        )
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise EntryProofError(f"entry {index} is in the log but is no JSON: {exc}") from exc
    claimed = entry.get("idx") if isinstance(entry, dict) else None
    if type(claimed) is not int or claimed != index:
        raise EntryProofError(f"the entry proven at position {index} claims another index")
    return ProvenEntry(index, size, entry)
