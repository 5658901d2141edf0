"""The audit trail across two real nodes: the journey's entries on both sides, the auditor's
API and offline verification, and peers catching a node that rewrites its history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, select, update

from app.audit.anchor import SignedLogAnchor
from app.audit.checkpoints import log_origin, log_verifier_key
from app.audit.cosignature import verify_cosignature, witness_name
from app.audit.log import STORED_LEVEL
from app.audit.mac import entry_mac, mac_key, macs_of
from app.audit.merkle import CompactRange, leaf_hash, verify_inclusion
from app.audit.note import Checkpoint, open_note, parse_verifier_key, sign_note
from app.crypto.encoding import canonical_json
from app.crypto.identity import parse_identity_document
from app.crypto.keys import NodeKeys, load_keys
from app.db import make_engine, make_session_factory, unit_of_work
from app.localnodes import LocalNode
from app.models import AuditCheckpoint, AuditEntry, AuditHead, AuditIndex, AuditNode
from tests.conftest import migrated_sqlite
from tests.e2e.conftest import EXAMPLE, wait_for

SETUP = ["key.created"] * 3 + ["client.created"] * 3 + ["peer.added"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, LocalNode]]:
    base = tmp_path_factory.mktemp("audit-nodes")
    quiet = {"ENTRAIDE_AUDIT_CHECKPOINT_SECONDS": "3600"}  # checkpoints only when asked
    es = LocalNode(
        "ES/MJ", "Ministerio", base / "es", migrated_sqlite(base / "es.db"), extra_env=quiet
    )
    ar = LocalNode(
        "AR/MPF", "Fiscal", base / "ar", migrated_sqlite(base / "ar.db"), extra_env=quiet
    )
    try:
        for node in (es, ar):
            node.init(clients={role: (role,) for role in ("admin", "officer", "auditor")})
            node.start()
        es.pin(ar)
        ar.pin(es)
        yield es, ar
    finally:
        es.stop()
        ar.stop()


def _entries(node: LocalNode, **filters: Any) -> list[dict[str, Any]]:
    with node.client("auditor") as http:
        response = http.get("/api/v1/audit", params={"limit": 500, **filters})
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return list(reversed(items))


def _wait_entry(node: LocalNode, action: str, count: int = 1) -> None:
    wait_for(
        f"{count} {action} on {node.authority_id}",
        lambda: len(_entries(node, action=action)) >= count,
    )


def _actions(node: LocalNode) -> list[str]:
    return [entry["action"] for entry in _entries(node)]


def test_journey_leaves_the_expected_entries_on_both_nodes(
    pair: tuple[LocalNode, LocalNode],
) -> None:
    es, ar = pair
    with es.client("officer") as http:
        request_id = http.post("/api/v1/requests", json=EXAMPLE).json()["id"]
    _wait_entry(es, "witness.cosigned")
    _wait_entry(ar, "receipt.issued")
    with ar.client("officer") as http:
        assert http.get(f"/api/v1/requests/{request_id}").status_code == 200
        ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
        assert http.post(f"/api/v1/requests/{request_id}/messages", json=ack).status_code == 201
    _wait_entry(ar, "witness.cosigned")
    _wait_entry(es, "receipt.issued")
    result = {
        # Any reply with an attachment does: a status answer moves no state (the lifecycle's
        # own journey is tests/e2e/lifecycle.py).
        "document": {"type": "status_answer", "text": "Done."},
        "attachments": [{"name": "r.txt", "media_type": "text/plain", "content_base64": "b2s="}],
    }
    with ar.client("officer") as http:
        assert http.post(f"/api/v1/requests/{request_id}/messages", json=result).status_code == 201
    _wait_entry(ar, "receipt.received", 2)
    _wait_entry(es, "receipt.issued", 2)
    with es.client("officer") as http:
        detail = http.get(f"/api/v1/requests/{request_id}").json()
        assert http.get(detail["messages"][2]["attachments"][0]["href"]).content == b"ok"

    assert _actions(es) == [
        *SETUP,
        "request.submitted",
        "envelope.sealed",
        "delivery.attempt",
        "receipt.received",
        "witness.cosigned",
        "envelope.received",
        "receipt.issued",
        "envelope.received",
        "receipt.issued",
        "request.read",
        "attachment.downloaded",
    ]
    assert _actions(ar) == [
        *SETUP,
        "envelope.received",
        "receipt.issued",
        "request.read",
        "envelope.sealed",
        "message.submitted",
        "delivery.attempt",
        "receipt.received",
        "witness.cosigned",
        "envelope.sealed",
        "message.submitted",
        "delivery.attempt",
        "receipt.received",
    ]
    reads = _entries(ar, action="request.read")
    assert reads[0]["actor"] == "client:officer"
    assert reads[0]["request_id"] == request_id
    # No entry carries request content.
    everything = json.dumps(_entries(es) + _entries(ar))
    assert EXAMPLE["document"]["summary_of_facts"][:40] not in everything
    assert "Registered." not in everything


def test_roles_separate_content_and_audit(pair: tuple[LocalNode, LocalNode]) -> None:
    es, _ = pair
    with es.client("officer") as http:
        assert http.get("/api/v1/audit").status_code == 403
    with es.client("auditor") as http:
        assert http.get("/api/v1/requests").status_code == 403
        assert http.get("/api/v1/audit", params={"action": "request.read"}).status_code == 200


def test_a_time_without_a_zone_is_refused_not_guessed(pair: tuple[LocalNode, LocalNode]) -> None:
    es, _ = pair
    with es.client("auditor") as http:
        for name in ("since", "until"):
            naive = http.get("/api/v1/audit", params={name: "2024-01-01T00:00:00"})
            assert naive.status_code == 422, naive.text  # was a 500
            aware = http.get("/api/v1/audit", params={name: "2024-01-01T00:00:00+01:00"})
            assert aware.status_code == 200, aware.text


def test_inclusion_proof_from_the_api_checks_against_the_checkpoint(
    pair: tuple[LocalNode, LocalNode],
) -> None:
    es, _ = pair
    with es.client("auditor") as http:
        checkpoint = http.post("/api/v1/audit/checkpoint").json()
        key = parse_verifier_key(http.get("/api/v1/audit/checkpoint").json()["log_key"])
        text, _ = open_note(checkpoint["note"], [key])
        parsed = Checkpoint.parse(text)
        entry = _entries(es, action="request.submitted")[0]
        proof = http.get(
            "/api/v1/audit/proofs/inclusion", params={"index": entry["idx"], "size": parsed.size}
        ).json()
    hashes = [bytes.fromhex(item) for item in proof["proof"]]
    assert verify_inclusion(
        bytes.fromhex(entry["leaf_hash"]), entry["idx"], parsed.size, hashes, parsed.root_hash
    )


def test_export_then_verify_offline_and_catch_an_edit(
    pair: tuple[LocalNode, LocalNode], tmp_path: Path
) -> None:
    es, _ = pair
    out = tmp_path / "export"
    es.cli("audit", "export", "--out", str(out))
    verified = es.cli("audit", "verify", str(out))
    assert verified.stdout.startswith("OK: ")
    lines = (out / "entries.jsonl").read_bytes().splitlines()
    fields = json.loads(lines[9])
    fields["actor"] = "client:someone-else"
    lines[9] = canonical_json(fields)
    (out / "entries.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    failed = es.cli("audit", "verify", str(out), check=False)
    assert failed.returncode == 1
    assert "entry 9 was altered" in failed.stderr


def test_verify_db_checks_the_log_key_the_auditor_trusts(
    pair: tuple[LocalNode, LocalNode], tmp_path: Path
) -> None:
    """From review: `audit verify --db --log-key K` ignored K (even garbage verified), so an
    insider who replaced the node's log key and re-signed a rewritten log passed the check
    an auditor is told to run with the key saved at the last audit."""
    es, _ = pair
    out = tmp_path / "export"
    es.cli("audit", "export", "--out", str(out))
    trusted = (out / "log.vkey").read_text().strip()
    assert es.cli("audit", "verify", "--db", "--log-key", trusted).stdout.startswith("OK: ")
    other = log_verifier_key(es.authority_id, NodeKeys.generate().log)
    replaced = es.cli("audit", "verify", "--db", "--log-key", other, check=False)
    assert replaced.returncode == 1
    assert "FAILED: this node's log key" in replaced.stderr
    assert "is not the one you trust" in replaced.stderr
    garbage = es.cli("audit", "verify", "--db", "--log-key", "garbage", check=False)
    assert garbage.returncode == 1
    assert "--log-key is not a log verifier key" in garbage.stderr
    assert "Traceback" not in garbage.stderr


def _rewrite_history(node: LocalNode) -> None:
    """What an insider holding the log key (the keys folder) could do: edit an old entry and
    rebuild, re-MAC and re-sign everything, the record of what was signed beside the keys included,
    so that the node's own verification still passes."""
    keys = load_keys(node.keys_dir)
    engine = make_engine(node.database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            entries = list(session.scalars(select(AuditEntry).order_by(AuditEntry.idx)))
            fields = json.loads(entries[3].entry)
            fields["actor"] = "operator:nobody"
            entries[3].entry = canonical_json(fields)
            entries[3].actor = "operator:nobody"  # and what queries read, as a careful insider
            session.execute(
                update(AuditIndex).where(AuditIndex.idx == 3).values(actor="operator:nobody")
            )
            compact = CompactRange()
            session.execute(delete(AuditNode))
            roots: dict[int, bytes] = {}
            previous: bytes | None = None
            for entry in entries:
                data = json.loads(entry.entry)
                data["prev_leaf"] = previous.hex() if previous else None
                entry.entry = canonical_json(data)
                entry.leaf_hash = leaf_hash(entry.entry)
                entry.mac = entry_mac(mac_key(keys.log), entry.entry)  # the key makes MACs too
                previous = entry.leaf_hash

                def keep(level: int, position: int, digest: bytes) -> None:
                    if level >= STORED_LEVEL:  # as appends store them
                        session.add(AuditNode(level=level, position=position, hash=digest))

                compact.append(entry.leaf_hash, visit=keep)
                roots[compact.size] = compact.root()
            # And the head MAC of the entry the head ends on (app/audit/mac.py).
            entries[-1].mac = macs_of(mac_key(keys.log), entries[-1].entry, compact.root())
            head = session.get(AuditHead, 1)
            assert head is not None
            head.compact_range, head.root_hash = compact.to_bytes(), compact.root()
            head.last_leaf_hash = previous
            origin = log_origin(node.authority_id)
            for checkpoint in session.scalars(select(AuditCheckpoint)):
                checkpoint.root_hash = roots[checkpoint.size]
                body = Checkpoint(origin, checkpoint.size, checkpoint.root_hash).format()
                checkpoint.note = sign_note(body, origin, keys.log)
            anchor = SignedLogAnchor(node.keys_dir / "log-signed.json")
            signed = anchor.read()
            assert signed is not None
            anchor.reset(signed.size, roots[signed.size])
    finally:
        engine.dispose()


def test_a_node_that_rewrites_history_is_caught_by_its_peer(
    pair: tuple[LocalNode, LocalNode],
) -> None:
    es, ar = pair
    # AR shows a fresh checkpoint to ES in the next receipt; ES checks and cosigns it.
    with ar.client("auditor") as http:
        shown = http.post("/api/v1/audit/checkpoint").json()
    cosigned_before = len(_entries(es, action="witness.cosigned"))
    with es.client("officer") as http:
        assert http.post("/api/v1/requests", json=EXAMPLE).status_code == 201
    _wait_entry(es, "witness.cosigned", cosigned_before + 1)

    # AR can fetch ES's cosignature of its checkpoint back, and it verifies.
    identity = parse_identity_document(httpx.get(es.url + "/.well-known/entraide/node").json())
    note = httpx.get(es.url + "/p2p/v1/audit/cosignature", params={"authority": "AR/MPF"}).json()[
        "note"
    ]
    body, _, _ = note.partition("\n\n")
    assert Checkpoint.parse(body + "\n").size == shown["size"]
    cosignature = note.rstrip("\n").rsplit("\n", 1)[1] + "\n"
    assert verify_cosignature(
        body + "\n", cosignature, name=witness_name("ES/MJ"), public_key=identity.log.public_key
    )
    # So can AR's auditor, with ES's witness key (`keys show` on ES): AR's log extends it.
    saved = ar.workdir / "cosigned-by-es.note"
    saved.write_text(note)
    shown_keys = es.cli("keys", "show").stdout
    witness_key = shown_keys.split("witness key:", 1)[1].split()[0]
    assert witness_key.startswith(witness_name("ES/MJ") + "+")
    by_witness = ["--cosigned", str(saved), "--witness-key", witness_key]
    verified = ar.cli("audit", "verify", "--db", *by_witness)
    assert f"cosigned by {witness_name('ES/MJ')}" in verified.stdout

    # AR rewrites its past, re-signing every checkpoint: its own verification still passes...
    ar.stop()
    _rewrite_history(ar)
    ar.start()
    assert ar.cli("audit", "verify", "--db").returncode == 0
    # ...but not against what its witness cosigned: the auditor catches it without the witness.
    caught = ar.cli("audit", "verify", "--db", *by_witness, check=False)
    assert caught.returncode == 1
    assert "the log is not consistent with the checkpoint in cosigned-by-es.note" in caught.stderr
    # Nor against the checkpoint its auditor saved, beside the (re-signed) current one, as
    # audit.md tells: each `--checkpoint` is checked (only the last one was, from review).
    saved_before = ar.workdir / "shown.note"
    saved_before.write_text(shown["note"])
    with ar.client("auditor") as http:
        current = ar.workdir / "current.note"
        current.write_text(http.get("/api/v1/audit/checkpoint").json()["note"])
    for notes in ([saved_before, current], [current, saved_before]):
        given = [part for note in notes for part in ("--checkpoint", str(note))]
        caught = ar.cli("audit", "verify", "--db", *given, check=False)
        assert caught.returncode == 1, caught.stdout
        assert "the log is not consistent with the checkpoint in shown.note" in caught.stderr
        # Its own re-signed checkpoint of that size matches the rewritten entries: said so,
        # and the range starts below it ("entries S to S-1" before, from review).
        assert "the log key signed two different logs" in caught.stderr
        size = shown["size"]
        assert f"entries {size} to {size - 1}" not in caught.stderr
    with ar.client("auditor") as http:
        assert http.post("/api/v1/audit/checkpoint").json()["size"] > shown["size"]

    # ...but at the next receipt ES finds no consistency proof from what it was shown before.
    with es.client("officer") as http:
        assert http.post("/api/v1/requests", json=EXAMPLE).status_code == 201
    _wait_entry(es, "witness.alarm")
    with es.client("auditor") as http:
        alarms = http.get("/api/v1/audit/alarms").json()
    assert len(alarms) == 1
    assert alarms[0]["peer"] == "AR/MPF"
    assert "consistency" in alarms[0]["reason"]
    assert alarms[0]["known_checkpoint"].startswith(f"{log_origin('AR/MPF')}\n{shown['size']}\n")
