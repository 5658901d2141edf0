"""An auditor checks a log against checkpoints its witnesses cosigned (`audit verify
--cosigned NOTE --witness-key KEY`): the cosignature must verify with the witness's key, and
the log must extend what the witness saw. A node that showed its witness one history and its
auditor another is caught by the auditor alone, without asking the witness anything more."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from typer.testing import CliRunner

from app.audit.checkpoints import log_origin
from app.audit.cosignature import (
    BadCosignature,
    NoCosignature,
    check_cosignatures,
    cosign,
    format_cosigner_key,
    parse_cosigner_key,
    witness_name,
)
from app.audit.note import Checkpoint, MalformedKey, format_verifier_key, sign_note, split_note
from app.audit.service import EXPORT_CHECKPOINTS, verify_export
from app.audit.witness import parse_peer_checkpoint
from app.cli import app
from app.crypto.keys import NodeKeys
from app.localnodes import LocalNode
from app.models import Peer
from tests.audit.test_verify_edges import AUTHORITY, _export
from tests.conftest import migrated_sqlite

WITNESS = witness_name("AR/MPF")
WHEN = int(datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp())


def _cosigned(note: str, key: SigningKey, *, name: str = WITNESS, when: int = WHEN) -> str:
    text, _ = split_note(note)
    return note + cosign(text, name=name, key=key, timestamp=when)


def _note_of_size(out: Path, size: int) -> str:
    for line in (out / EXPORT_CHECKPOINTS).read_text().splitlines():
        note: str = json.loads(line)["note"]
        if Checkpoint.parse(split_note(note)[0]).size == size:
            return note
    raise AssertionError(f"no checkpoint of size {size}")


def test_a_witness_key_reads_back_as_written_and_refuses_any_other() -> None:
    key = SigningKey.generate()
    written = format_cosigner_key(WITNESS, key.verify_key)
    read = parse_cosigner_key(written)
    assert (read.name, read.public_key) == (WITNESS, bytes(key.verify_key))
    name, key_id, encoded = written.split("+", 2)
    other_id = f"{int(key_id, 16) ^ 1:08x}"
    with pytest.raises(MalformedKey, match="ID does not match"):
        parse_cosigner_key(f"{name}+{other_id}+{encoded}")
    # A note signer's key (type 0x01) is not a cosigner's (0x04): the two never stand in.
    with pytest.raises(MalformedKey, match="not an Ed25519 key"):
        parse_cosigner_key(format_verifier_key(WITNESS, key.verify_key))
    with pytest.raises(MalformedKey):
        parse_cosigner_key("entraide.witness/AR/MPF")


def test_a_cosignature_verifies_with_its_witness_key_alone(tmp_path: Path) -> None:
    keys, witness = NodeKeys.generate(), SigningKey.generate()
    note = _note_of_size(_export(tmp_path, keys), 32)
    trusted = parse_cosigner_key(format_cosigner_key(WITNESS, witness.verify_key))

    found = check_cosignatures(_cosigned(note, witness), [trusted])
    assert [(item.name, item.time) for item in found] == [
        (WITNESS, datetime.fromtimestamp(WHEN, tz=UTC))
    ]
    # The log's own signature is no cosignature, whatever name it is made under.
    with pytest.raises(NoCosignature):
        check_cosignatures(note, [trusted])
    text, _ = split_note(note)
    signed_as_witness = note + sign_note(text, WITNESS, witness).split("\n\n")[1]
    with pytest.raises(NoCosignature):
        check_cosignatures(signed_as_witness, [trusted])
    # Another witness's cosignature is not the one asked for.
    stranger = SigningKey.generate()
    with pytest.raises(NoCosignature):
        check_cosignatures(_cosigned(note, stranger), [trusted])


def test_a_cosignature_over_other_text_or_time_does_not_verify(tmp_path: Path) -> None:
    keys, witness = NodeKeys.generate(), SigningKey.generate()
    out = _export(tmp_path, keys)
    trusted = parse_cosigner_key(format_cosigner_key(WITNESS, witness.verify_key))
    cosigned = _cosigned(_note_of_size(out, 32), witness)
    line = cosigned.rstrip("\n").rsplit("\n", 1)[1]
    # The same cosignature line moved onto another checkpoint of the same log.
    moved = _note_of_size(out, 16) + line + "\n"
    with pytest.raises(BadCosignature, match="does not verify"):
        check_cosignatures(moved, [trusted])
    # Its time changed (the witness says when it saw the checkpoint: that is signed too).
    prefix, encoded = line.rsplit(" ", 1)
    blob = bytearray(base64.b64decode(encoded))
    blob[11] ^= 1
    retimed = cosigned.replace(line, f"{prefix} {base64.b64encode(bytes(blob)).decode()}")
    with pytest.raises(BadCosignature, match="does not verify"):
        check_cosignatures(retimed, [trusted])


def test_the_log_must_extend_what_its_witness_cosigned(tmp_path: Path) -> None:
    keys, witness = NodeKeys.generate(), SigningKey.generate()
    out = _export(tmp_path, keys)
    seen = _cosigned(_note_of_size(out, 32), witness)
    label = f"the checkpoint cosigned by {WITNESS}"
    report = verify_export(out, extends=[(label, seen)])
    assert report.ok, report.problems

    # The node showed its witness another history at size 32, signed with its own log key:
    # the export it gives the auditor verifies alone, and not against what the witness saw.
    forked = Checkpoint(log_origin(AUTHORITY), 32, bytes(32)).format()
    shown = _cosigned(sign_note(forked, log_origin(AUTHORITY), keys.log), witness)
    alone = verify_export(out)
    assert alone.ok, alone.problems
    report = verify_export(out, extends=[(label, shown)])
    assert report.first is not None
    assert f"the log is not consistent with {label} of size 32" in report.first.message

    # The witness saw more of the log than the export holds: the export was cut back.
    longer = Checkpoint(log_origin(AUTHORITY), 48, bytes(32)).format()
    ahead = _cosigned(sign_note(longer, log_origin(AUTHORITY), keys.log), witness)
    report = verify_export(out, extends=[(label, ahead)])
    assert report.first is not None
    assert f"{label} covers 48 entries but only 40 exist" in report.first.message


def _verify(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", "verify", *args])
    return result.exit_code, result.output


def test_audit_verify_checks_cosigned_checkpoints(tmp_path: Path) -> None:
    keys, witness = NodeKeys.generate(), SigningKey.generate()
    out = _export(tmp_path, keys)
    witness_key = format_cosigner_key(WITNESS, witness.verify_key)
    saved = tmp_path / "cosignature.json"  # the witness's answer, saved as it came
    saved.write_text(json.dumps({"note": _cosigned(_note_of_size(out, 32), witness)}))

    code, output = _verify(str(out), "--cosigned", str(saved), "--witness-key", witness_key)
    assert code == 0, output
    assert (
        f"cosignature.json: cosigned by {WITNESS} at 2026-11-29T12:00:00+00:00; the log extends it"
        in output
    )

    forked = Checkpoint(log_origin(AUTHORITY), 32, bytes(32)).format()
    shown = tmp_path / "shown.note"
    shown.write_text(_cosigned(sign_note(forked, log_origin(AUTHORITY), keys.log), witness))
    code, output = _verify(str(out), "--cosigned", str(shown), "--witness-key", witness_key)
    assert code == 1
    assert (
        f"FAILED: the log is not consistent with the checkpoint in shown.note cosigned by {WITNESS}"
        in output
    )

    stranger = format_cosigner_key(WITNESS, SigningKey.generate().verify_key)
    code, output = _verify(str(out), "--cosigned", str(saved), "--witness-key", stranger)
    assert code == 1
    assert "no cosignature by the witness keys given" in output

    code, output = _verify(str(out), "--cosigned", str(saved))
    assert code == 1
    assert "--cosigned and --witness-key go together" in output
    code, output = _verify(str(out), "--cosigned", str(saved), "--witness-key", "nonsense")
    assert code == 1
    assert "cannot read the witness key" in output
    saved.write_text('{"other": 1}')
    code, output = _verify(str(out), "--cosigned", str(saved), "--witness-key", witness_key)
    assert code == 1
    assert 'without a "note"' in output


def test_a_witness_key_that_is_the_logs_own_key_is_refused(tmp_path: Path) -> None:
    """From review: a cosignature made with the log's own key (which the node's operator
    holds) was accepted as a witness's, under any witness name; it proves nothing a witness
    saw. Refused where witness keys are given, whatever the note holds."""
    keys = NodeKeys.generate()
    out = _export(tmp_path, keys)
    own = format_cosigner_key(WITNESS, keys.log.verify_key)
    saved = tmp_path / "cosignature.json"
    saved.write_text(json.dumps({"note": _cosigned(_note_of_size(out, 32), keys.log)}))
    for extra in ([], ["--log-key", (out / "log.vkey").read_text().strip()]):
        code, output = _verify(str(out), "--cosigned", str(saved), "--witness-key", own, *extra)
        assert code == 1, output
        assert f"the witness key {WITNESS} is this log's own key" in output
    # With another witness's key beside it, still refused: the operator meant it as one.
    other = format_cosigner_key(WITNESS, SigningKey.generate().verify_key)
    code, output = _verify(
        str(out), "--cosigned", str(saved), "--witness-key", other, "--witness-key", own
    )
    assert code == 1, output
    assert "is this log's own key" in output


def test_a_live_log_refuses_its_own_witness_key(tmp_path: Path) -> None:
    """`audit verify --db` with the witness key `keys show` prints on the same node: the
    mistake an auditor copying keys from the node it audits makes."""
    url = migrated_sqlite(tmp_path / "es.db")
    node = LocalNode("ES/MJ", "Ministerio de Justicia", tmp_path / "es", url)
    node.init()
    shown = node.cli("keys", "show").stdout
    own = next(line.split()[-1] for line in shown.splitlines() if line.startswith("witness key:"))
    saved = tmp_path / "cosignature.json"
    saved.write_text(json.dumps({"note": "anything"}))
    verified = node.cli(
        "audit", "verify", "--db", "--cosigned", str(saved), "--witness-key", own, check=False
    )
    assert verified.returncode == 1
    assert "witness key entraide.witness/ES/MJ is this log's own key" in verified.stderr


def test_a_note_full_of_other_signatures_is_cosigned_readable(tmp_path: Path) -> None:
    """From review: a peer's note may carry 100 signature lines; kept as it came, with our
    cosignature appended it had 101, which no reader takes, so the witness's evidence could be
    spoilt by the node it watches. The witness keeps the log key's own line only."""
    keys, witness = NodeKeys.generate(), SigningKey.generate()
    note = _note_of_size(_export(tmp_path, keys), 32)
    junk = "".join(f"— junk{n} {base64.b64encode(bytes(5)).decode()}\n" for n in range(99))
    crowded = note + junk
    assert len(split_note(crowded)[1]) == 100  # as many as a note may carry
    peer = Peer(authority_id=AUTHORITY, log_key=keys.log_public)
    observed = parse_peer_checkpoint(peer, crowded)
    assert observed.note == note  # the log key's line alone
    trusted = parse_cosigner_key(format_cosigner_key(WITNESS, witness.verify_key))
    assert check_cosignatures(_cosigned(observed.note, witness), [trusted])
    # Nor the log key's own line a hundred times (from review): one is kept.
    own_line = note.split("\n\n", 1)[1]
    repeated = note + own_line * 99
    assert len(split_note(repeated)[1]) == 100
    assert parse_peer_checkpoint(peer, repeated).note == note
