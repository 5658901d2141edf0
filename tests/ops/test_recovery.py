"""`entraide peers recover`: a node restored from a backup takes back, from its peer, what the
two exchanged after the backup, and the conversation goes on. Real node processes, both
backends; the peer's listing endpoint refuses what is not its restored peer's own request."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import utc_now
from app.crypto.keys import load_keys
from app.db import make_engine
from app.localnodes import LocalNode
from app.migrate import ROOT
from app.models import AuditEntry, OutboxItem
from app.recovery.request import sign_part_request, sign_request
from tests.conftest import BACKENDS
from tests.e2e.conftest import read_request, submit_example, wait_delivered, wait_for
from tests.ops.nodes import Pair, pinned_pair
from tests.ops.test_backup import PASSPHRASE
from tests.requests_cli import requests_output

AR_REQUEST = {"requesting_authority": "AR/MPF", "requested_authority": "ES/MJ"}
EXAMPLES = ROOT / "docs" / "examples"
LETTER = EXAMPLES / "letter-of-request.txt"


def _send(node: LocalNode, request_id: str, document: dict[str, Any]) -> None:
    with node.client("officer") as http:
        response = http.post(f"/api/v1/requests/{request_id}/messages", json={"document": document})
    assert response.status_code == 201, response.text


def _agreed(pair: Pair, request_id: str, status: str) -> list[str]:
    def same() -> list[str] | None:
        es, ar = _read(pair.es, request_id), _read(pair.ar, request_id)
        if es is None or ar is None:  # not arrived yet
            return None
        ids = [message["msg_id"] for message in es["messages"]]
        if ids != [message["msg_id"] for message in ar["messages"]]:
            return None
        if es["status"] != status or ar["status"] != status:
            return None
        if not all(m["receipt"] for m in es["messages"] if m["direction"] == "outbound"):
            return None
        return ids

    result: list[str] = wait_for(f"both nodes at {status}", same)
    return result


def _read(node: LocalNode, request_id: str) -> dict[str, Any] | None:
    with node.client("officer") as http:
        response = http.get(f"/api/v1/requests/{request_id}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


def _ar_request(pair: Pair) -> str:
    """A request from AR/MPF to ES/MJ (the example, the other way round)."""
    from tests.e2e.conftest import EXAMPLE

    body = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(AR_REQUEST)
    with pair.ar.client("officer") as http:
        response = http.post("/api/v1/requests", json=body)
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    return request_id


def _send_streamed(node: LocalNode, request: Path) -> str:
    """`entraide requests send REQUEST --attach LETTER` at the node: its evidence streamed."""
    sent = requests_output(
        node.url, node.tokens["officer"], "send", str(request), "--attach", str(LETTER)
    )
    return sent.strip()


def _from_ar(tmp_path: Path) -> Path:
    """The project's example request, sent the other way round."""
    body = json.loads((EXAMPLES / "send.json").read_text())
    body["to"] = "ES/MJ"
    body["document"].update(AR_REQUEST)
    path = tmp_path / "from-ar.json"
    path.write_text(json.dumps(body))
    return path


def _view(node: LocalNode, request_id: str) -> dict[str, Any]:
    """What an officer sees of a request, but for when this node wrote its row."""
    detail = read_request(node, request_id)
    return {
        "status": detail["status"],
        "messages": [
            (m["msg_id"], m["direction"], m["content"], m["receipt"]) for m in detail["messages"]
        ],
    }


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_restored_node_takes_back_what_it_exchanged_after_its_backup(
    backend: str, tmp_path: Path
) -> None:
    with pinned_pair(backend, tmp_path) as pair:
        es, ar = pair.es, pair.ar
        first = submit_example(es)
        wait_delivered(es, first)
        _send(ar, first, {"type": "acknowledgement", "text": "Registered."})
        _agreed(pair, first, "acknowledged")
        # One of ours not yet receipted when the backup is taken: its peer is down.
        ar.stop()
        unreceipted = submit_example(es)
        secret = tmp_path / "pass"
        secret.write_text(PASSPHRASE)
        secret.chmod(0o600)
        archive = tmp_path / "backups" / "es.tar.gz"
        archive.parent.mkdir(mode=0o700)
        es.cli(
            "backup", "--out", str(archive), "--include-private-keys", "--passphrase-file",
            str(secret),
        )  # fmt: skip
        ar.start()
        _agreed(pair, unreceipted, "delivered")

        # After the backup, both ways: the peer's question and our answer (each follows the
        # other), a request the peer opened, one we opened.
        _send(ar, first, {"type": "additional_information_request", "text": "Which period?"})
        _agreed(pair, first, "additional_information_requested")
        _send(es, first, {"type": "additional_information", "text": "August 2026."})
        _agreed(pair, first, "additional_information_supplied")
        _send(ar, first, {"type": "consultation", "text": "May the bank be told?"})
        _agreed(pair, first, "additional_information_supplied")
        theirs = _ar_request(pair)
        _agreed(pair, theirs, "delivered")
        ours = submit_example(es)
        _agreed(pair, ours, "delivered")
        # And one request each way whose evidence is streamed (not in the envelope).
        streamed_ours = _send_streamed(es, EXAMPLES / "send.json")
        _agreed(pair, streamed_ours, "delivered")
        streamed_theirs = _send_streamed(ar, _from_ar(tmp_path))
        _agreed(pair, streamed_theirs, "delivered")
        requests = (first, theirs, ours, unreceipted, streamed_ours, streamed_theirs)
        before = {request: _view(es, request) for request in requests}
        es.stop()

        # The machine is lost; restored from the backup, the node lacks all of that.
        restored = LocalNode(
            "ES/MJ", "Ministerio de Justicia", tmp_path / "es-new",
            pair.databases.new("es-new"), port=es.port,
        )  # fmt: skip
        restored.workdir.mkdir()
        restored.tokens = dict(es.tokens)
        out = restored.cli("restore", str(archive), "--passphrase-file", str(secret))
        assert "entraide peers recover" in out.stdout, out.stdout

        # Until it is done, doctor says so (a warning: the node may start).
        warned = restored.cli("doctor", check=False).stdout
        assert "warn  recovery" in warned, warned
        assert "`entraide peers recover AR/MPF`" in warned, warned
        recovered = restored.cli("peers", "recover", "AR/MPF")
        said = recovered.stdout + recovered.stderr
        assert "4 of AR/MPF's and 3 of ours taken back" in recovered.stdout, said
        # The one the backup holds unreceipted is delivered with the peer's receipt.
        assert "1 of ours here but unreceipted now delivered" in recovered.stdout, said
        # Asked again, of every peer: all here already, nothing twice.
        again = restored.cli("peers", "recover", "--all")
        assert "0 of AR/MPF's and 0 of ours taken back" in again.stdout, again.stdout
        unknown = restored.cli("peers", "recover", "FR/MJ", check=False)
        assert unknown.returncode == 1
        assert "FR/MJ is not a pinned peer" in unknown.stderr, unknown.stderr
        neither = restored.cli("peers", "recover", check=False)
        assert (neither.returncode, "name a peer, or give --all" in neither.stderr) == (1, True)
        assert "recovery" not in restored.cli("doctor", check=False).stdout
        try:
            restored.start()
            pair.es = restored  # stopped with the pair
            after = {request: _view(restored, request) for request in requests}
            # The same messages in the same order, the same statuses, and the same receipts,
            # signed when they were first given.
            assert after == before
            # The streamed evidence came back from AR/MPF's blob store, byte for byte.
            for request in (streamed_ours, streamed_theirs):
                out = tmp_path / f"got-{request}"
                token = restored.tokens["officer"]
                requests_output(restored.url, token, "download", request, "--out", str(out))
                assert (out / LETTER.name).read_bytes() == LETTER.read_bytes()
            # Our own message came back as delivered: nothing sent again.
            engine = make_engine(restored.database_url)
            try:
                with engine.connect() as connection:
                    states = set(connection.scalars(select(OutboxItem.state)))
                    actions = list(connection.scalars(select(AuditEntry.action)))
            finally:
                engine.dispose()
            assert states == {"delivered"}
            assert actions.count("receipt.recovered") == 4
            assert actions.count("message.recovered") == 3
            assert actions.count("peer.recovered") == 2
            # The conversation goes on from where it was.
            _send(ar, first, {"type": "acceptance", "text": "Accepted."})
            _agreed(pair, first, "accepted")
            _send(restored, first, {"type": "status_query", "text": "Any news?"})
            _agreed(pair, first, "accepted")
        finally:
            restored.stop()
        verified = restored.cli("audit", "verify", "--db")
        assert verified.stdout.startswith("OK"), verified.stdout + verified.stderr


def _post(node: LocalNode, body: object) -> httpx.Response:
    with httpx.Client(base_url=node.url, timeout=30) as http:
        return http.post("/p2p/v1/recovery", json=body)


@pytest.mark.e2e
def test_the_listing_is_given_only_to_the_peer_itself_and_fresh(tmp_path: Path) -> None:
    with pinned_pair("sqlite", tmp_path) as pair:
        es, ar = pair.es, pair.ar
        wait_delivered(es, submit_example(es))
        keys = load_keys(es.keys_dir)
        now = utc_now()

        def signed(**changes: Any) -> dict[str, str]:
            fields: dict[str, Any] = {
                "sig_kid": keys.signing_kid,
                "from_authority": "ES/MJ",
                "to_authority": "AR/MPF",
                "since": now - timedelta(days=1),
                "after": None,
                "created_at": now,
            }
            fields.update(changes)
            key = fields.pop("key", keys.signing)
            return sign_request(key, **fields)

        good = _post(ar, signed())
        assert good.status_code == 200, good.text
        entries = good.json()["entries"]
        assert [entry["role"] for entry in entries] == ["yours"]
        assert good.json()["next"] is None

        other = load_keys(ar.keys_dir).signing
        refusals = [
            ({"request": "x"}, 400, "malformed_recovery_request"),
            ("not an object", 400, "malformed_recovery_request"),
            (signed(key=other), 403, "bad_signature"),
            (signed(from_authority="FR/MJ"), 403, "unknown_sender"),
            (signed(to_authority="FR/MJ"), 421, "not_addressed_to_us"),
            (signed(created_at=now - timedelta(hours=1)), 400, "stale_request"),
            (signed(sig_kid="0" * 32), 403, "unknown_key"),
            (signed(after="2026-01-01T00:00:00Z/zz"), 400, "malformed_recovery_request"),
            # A cursor of the right shape whose time is no time (it was a 500, from review).
            (signed(after=f"2026-13-45T99:99:99Z/{'a' * 32}"), 400, "malformed_recovery_request"),
        ]
        for body, status, code in refusals:
            response = _post(ar, body)
            assert (response.status_code, response.json().get("error")) == (status, code), (
                body,
                response.text,
            )
        engine = make_engine(ar.database_url)
        try:
            with engine.connect() as connection:
                outcomes = list(
                    connection.scalars(
                        select(AuditEntry.outcome).where(AuditEntry.action == "recovery.refused")
                    )
                )
                served = list(
                    connection.scalars(
                        select(AuditEntry.peer).where(AuditEntry.action == "recovery.served")
                    )
                )
        finally:
            engine.dispose()
        assert outcomes == [code for _, _, code in refusals]
        assert served == ["ES/MJ"]


@pytest.mark.e2e
def test_a_listed_messages_streamed_part_is_given_to_its_peer_alone(tmp_path: Path) -> None:
    """`POST /p2p/v1/recovery/parts`: the ciphertext of a streamed part of a message the
    listing gives the asker, from an offset; nothing of any other."""
    with pinned_pair("sqlite", tmp_path) as pair:
        es, ar = pair.es, pair.ar
        streamed = _send_streamed(es, EXAMPLES / "send.json")
        wait_delivered(es, streamed)
        keys = load_keys(es.keys_dir)
        page = _post(ar, _listing(keys)).json()
        [entry] = page["entries"]
        assert (entry["role"], entry["streamed"], len(entry["envelope"]["parts"])) == (
            "yours",
            True,
            1,  # its manifest; the letter is asked for by itself
        )
        part = json.loads(base64.b64decode(entry["envelope"]["header"]))["parts"][1]

        def asked(**changes: Any) -> httpx.Response:
            fields: dict[str, Any] = {
                "sig_kid": keys.signing_kid,
                "from_authority": "ES/MJ",
                "to_authority": "AR/MPF",
                "msg_id": streamed,
                "index": 1,
                "offset": 0,
                "created_at": utc_now(),
            }
            fields.update(changes)
            key = fields.pop("key", keys.signing)
            with httpx.Client(base_url=ar.url, timeout=30) as http:
                return http.post("/p2p/v1/recovery/parts", json=sign_part_request(key, **fields))

        whole = asked()
        assert whole.status_code == 200, whole.text
        assert len(whole.content) == part["length"]
        assert hashlib.sha256(whole.content).hexdigest() == part["sha256"]
        assert asked(offset=10).content == whole.content[10:]
        refusals = [
            (asked(offset=part["length"] + 1), 400, "bad_offset"),
            (asked(index=2), 404, "unknown_part"),
            (asked(msg_id="0" * 32), 404, "unknown_part"),
            (asked(key=load_keys(ar.keys_dir).signing), 403, "bad_signature"),
            (asked(index=0), 400, "malformed_recovery_request"),
        ]
        for response, status, code in refusals:
            assert (response.status_code, response.json().get("error")) == (status, code)


def _listing(keys: Any) -> dict[str, str]:
    return sign_request(
        keys.signing,
        sig_kid=keys.signing_kid,
        from_authority="ES/MJ",
        to_authority="AR/MPF",
        since=utc_now() - timedelta(days=1),
        after=None,
        created_at=utc_now(),
    )
