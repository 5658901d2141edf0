"""One audit entry proven offline, as a court asks about one (from an auditor's review: the
API answered an entry's parsed fields and a proof, the bytes the leaf hashes had to be rebuilt
by the reader, and no command checked it).

The log is a real node's, appended and signed by the application's own code; the proof is the
auditor API's answer (`prove_inclusion`), saved to a file; the command reads nothing else.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from app.audit.checkpoints import log_verifier_key, sign_checkpoint
from app.audit.log import record
from app.audit.mac import append_with
from app.audit.service import prove_inclusion
from app.cli import app
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.models import AuditCheckpoint
from tests.conftest import migrated_sqlite

AUTHORITY = "ES/MJ"
KEYS = NodeKeys.generate()
VKEY = log_verifier_key(AUTHORITY, KEYS.log)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, str]]]:
    """A log of 20 entries signed at 8 and 20; the notes by size."""
    folder = tmp_path_factory.mktemp("entry-proof")
    engine = make_engine(migrated_sqlite(folder / "log.db"))
    sessions = append_with(make_session_factory(engine), KEYS.log)
    try:
        with unit_of_work(sessions) as session:
            for number in range(20):
                record(session, actor="officer:ana", action="request.read", details={"n": number})
                if number + 1 in (8, 20):
                    sign_checkpoint(session, authority_id=AUTHORITY, log_key=KEYS.log)
            notes = {row.size: row.note for row in session.scalars(select(AuditCheckpoint))}
            for size in (8, 20):
                for index in (0, 5, size - 1):
                    answer = prove_inclusion(session, index=index, size=size)
                    (folder / f"proof-{index}-{size}.json").write_text(json.dumps(answer))
        yield folder, notes
    finally:
        engine.dispose()


def _check(folder: Path, proof: Path, note: str, key: str = VKEY) -> Any:
    saved = folder / "checkpoint.json"
    saved.write_text(json.dumps({"size": 0, "note": note}))  # as GET .../checkpoint answers
    args = ["audit", "check-entry", str(proof), "--checkpoint", str(saved), "--log-key", key]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(("index", "size"), [(0, 8), (5, 8), (7, 8), (0, 20), (5, 20), (19, 20)])
def test_an_entry_is_proven_against_a_signed_checkpoint(
    signed: tuple[Path, dict[int, str]], index: int, size: int
) -> None:
    folder, notes = signed
    result = _check(folder, folder / f"proof-{index}-{size}.json", notes[size])
    assert result.exit_code == 0, result.output
    said, entry = result.stdout.splitlines()
    assert said == f"entry {index} is in the log of {size} entries that entraide.log/ES/MJ signed:"
    fields = json.loads(entry)
    assert (fields["idx"], fields["action"], fields["details"]) == (
        index,
        "request.read",
        {"n": index},
    )


def _changed(folder: Path, name: str, change: dict[str, Any]) -> Path:
    document = json.loads((folder / name).read_text())
    document.update(change)
    path = folder / f"changed-{len(list(folder.glob('changed-*')))}-{name}"
    path.write_text(json.dumps(document))
    return path


def test_a_changed_entry_a_wrong_size_or_another_key_is_refused(
    signed: tuple[Path, dict[int, str]],
) -> None:
    folder, notes = signed
    original = json.loads((folder / "proof-5-20.json").read_text())
    entry = json.loads(base64.b64decode(original["entry_base64"]))
    entry["actor"] = "officer:nobody"  # who read it, rewritten
    forged = base64.b64encode(json.dumps(entry).encode()).decode()
    cases = [
        (
            _changed(folder, "proof-5-20.json", {"entry_base64": forged}),
            notes[20],
            VKEY,
            "REFUSED: entry 5 as given is not in the log the checkpoint signs",
        ),
        (
            _changed(folder, "proof-5-20.json", {"index": 6}),
            notes[20],
            VKEY,
            "REFUSED: entry 6 as given is not in the log",
        ),
        (
            folder / "proof-5-20.json",
            notes[8],
            VKEY,
            "REFUSED: the proof is for a log of 20 entries, the checkpoint covers 8: ask for the "
            "proof with size=8",
        ),
        (
            folder / "proof-5-20.json",
            notes[20],
            log_verifier_key(AUTHORITY, NodeKeys.generate().log),
            "REFUSED: the checkpoint does not verify with the log key",
        ),
        (
            _changed(folder, "proof-5-20.json", {"entry_base64": None}),
            notes[20],
            VKEY,
            "REFUSED: the proof carries no entry_base64",
        ),
    ]
    for proof, note, key, said in cases:
        result = _check(folder, proof, note, key)
        assert result.exit_code == 1, result.output
        assert said in result.output, result.output
        assert "Traceback" not in result.output
