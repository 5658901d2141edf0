"""What a restored node takes back from a peer's recovery listing (app/recovery/recover.py),
entry by entry, on a real node in process: only what its own keys and the peer's pinned key
prove, whatever the peer lists. The peer here is the attacker: its listing is made by hand."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.crypto.encoding import format_time, utc_now
from app.crypto.envelope import Attachment, Recipient, WireEnvelope, seal
from app.crypto.keys import NodeKeys
from app.crypto.randomness import SystemRandomness
from app.crypto.receipts import SignedReceipt, issue_receipt
from app.db import unit_of_work
from app.models import CaseFile, Message, OutboxItem, Receipt
from app.recovery import listing, recover, take
from app.recovery.listing import Entry
from app.recovery.take import ALREADY, RECOVERED, Unrecoverable
from tests.requests.conftest import Harness, example_document

LETTER = Attachment("letter.txt", "text/plain", b"letter of request")


def _sealed(
    sender: NodeKeys,
    sender_authority: str,
    recipient: NodeKeys,
    recipient_authority: str,
    *,
    created_at: datetime | None = None,
) -> WireEnvelope:
    requesting = {"requesting_authority": sender_authority}
    document = example_document(**requesting, requested_authority=recipient_authority)
    return seal(
        sender_keys=sender,
        sender_authority=sender_authority,
        recipient=Recipient(recipient_authority, recipient.encryption_public),
        content={"kind": "request", "document": document},
        attachments=[LETTER],
        conversation_id=None,
        in_reply_to=None,
        created_at=created_at or utc_now(),
        ttl=timedelta(days=1),
        randomness=SystemRandomness(),
    )


def _receipt(
    signer: NodeKeys,
    envelope: WireEnvelope,
    *,
    sender: str,
    recipient: str,
    at: datetime | None = None,
    kid: str | None = None,
) -> SignedReceipt:
    header = json.loads(envelope.header)
    return issue_receipt(
        signer.signing,
        signer_kid=kid or signer.signing_kid,
        msg_id=header["msg_id"],
        envelope_hash=envelope.envelope_hash,
        from_authority=sender,
        to_authority=recipient,
        received_at=at or utc_now(),
        checkpoint=None,
    )


def _entry(
    role: str, envelope: WireEnvelope, receipt: SignedReceipt, at: str | None = None
) -> Entry:
    """As a peer lists it: at the time our signature gave it (our seal, our receipt)."""
    header = json.loads(envelope.header)
    if at is None:
        signed = header["created_at"] if role == "sent" else json.loads(receipt.body)
        at = signed if role == "sent" else signed["received_at"]
    return Entry(
        role=role,
        msg_id=header["msg_id"],
        at=at,
        in_reply_to=header["in_reply_to"],
        request_id=header["conversation_id"],
        wire=envelope.to_wire(),
        receipt=receipt.to_wire(),
        streamed=False,
    )


def _apply(harness: Harness, entry: Entry) -> str:
    with httpx.Client(timeout=5) as http:
        return take.apply(harness.node, http, entry, peer="ES/MJ")


def _stored(harness: Harness, msg_id: str) -> dict[str, Any] | None:
    with unit_of_work(harness.node.sessions) as session:
        message = session.scalar(select(Message).where(Message.msg_id == msg_id))
        if message is None:
            return None
        case = session.get(CaseFile, message.request_id)
        receipt = session.scalar(select(Receipt).where(Receipt.message_id == message.id))
        outbox = session.scalar(select(OutboxItem).where(OutboxItem.message_id == message.id))
        assert case is not None
        assert receipt is not None
        return {
            "direction": message.direction,
            "status": case.status,
            "receipt": receipt.body,
            "outbox": None if outbox is None else outbox.state,
        }


def test_a_peer_message_comes_back_only_with_this_nodes_own_receipt_of_it(
    fresh_ar: Harness,
) -> None:
    ar, es = fresh_ar.node.keys, fresh_ar.peer_keys
    envelope = _sealed(es, "ES/MJ", ar, "AR/MPF")
    msg_id = json.loads(envelope.header)["msg_id"]
    other = _sealed(es, "ES/MJ", ar, "AR/MPF")
    given = {"sender": "ES/MJ", "recipient": "AR/MPF"}
    refused = [
        # Signed by the peer itself, which proves nothing of what we took.
        (_receipt(es, envelope, **given), "not signed by a key of this node"),
        # Ours, but for another envelope.
        (_receipt(ar, other, **given), "not for the envelope"),
        # Ours, but dated after the envelope expired: never given so.
        (
            _receipt(ar, envelope, **given, at=utc_now() + timedelta(hours=25)),
            "received in the future",
        ),
    ]
    for receipt, said in refused:
        with pytest.raises(Unrecoverable, match=said):
            _apply(fresh_ar, _entry("received", envelope, receipt))
        assert _stored(fresh_ar, msg_id) is None
    ours = _receipt(ar, envelope, **given, at=utc_now() - timedelta(seconds=5))
    # Listed at another time than our receipt's, or under another id: not where it was taken.
    later = format_time(utc_now())
    with pytest.raises(Unrecoverable, match=r"listed at .* but was taken at"):
        _apply(fresh_ar, _entry("received", envelope, ours, at=later))
    renamed = _entry("received", envelope, ours)
    renamed.request_id = "0" * 32
    with pytest.raises(Unrecoverable, match="listed under other ids"):
        _apply(fresh_ar, renamed)
    assert _apply(fresh_ar, _entry("received", envelope, ours)) == RECOVERED
    assert _stored(fresh_ar, msg_id) == {
        "direction": "inbound",
        "status": "delivered",
        "receipt": ours.body,  # the one given then, not a new one
        "outbox": None,
    }
    assert _apply(fresh_ar, _entry("received", envelope, ours)) == ALREADY
    assert [outcome for _, outcome, _ in fresh_ar.audit("receipt.recovered")] == ["ok"]


def test_a_peer_message_whose_lifetime_ran_out_comes_back_on_our_receipt(
    fresh_ar: Harness,
) -> None:
    ar, es = fresh_ar.node.keys, fresh_ar.peer_keys
    sealed_at = utc_now() - timedelta(days=3)
    envelope = _sealed(es, "ES/MJ", ar, "AR/MPF", created_at=sealed_at)
    # Posted now, it is refused: it expired two days ago.
    posted = fresh_ar.post_envelope(envelope)
    assert (posted.status_code, posted.json()["error"]) == (400, "expired")
    given = {"sender": "ES/MJ", "recipient": "AR/MPF"}
    late = _receipt(ar, envelope, **given, at=sealed_at + timedelta(days=1, seconds=1))
    with pytest.raises(Unrecoverable, match="after the envelope expired"):
        _apply(fresh_ar, _entry("received", envelope, late))
    taken = _receipt(ar, envelope, **given, at=sealed_at + timedelta(minutes=1))
    assert _apply(fresh_ar, _entry("received", envelope, taken)) == RECOVERED


def test_a_message_of_ours_comes_back_only_as_our_key_and_the_peers_prove_it(
    fresh_ar: Harness,
) -> None:
    ar, es = fresh_ar.node.keys, fresh_ar.peer_keys
    given = {"sender": "AR/MPF", "recipient": "ES/MJ"}
    # Sealed by the peer in our name: its header does not verify with a key of ours.
    forged = _sealed(es, "AR/MPF", NodeKeys.generate(), "ES/MJ")
    with pytest.raises(Unrecoverable, match="a key this node does not hold"):
        _apply(fresh_ar, _entry("sent", forged, _receipt(es, forged, **given)))
    envelope = _sealed(ar, "AR/MPF", es, "ES/MJ")
    msg_id = json.loads(envelope.header)["msg_id"]
    # Ours, with a receipt not signed by the peer's pinned key (signed by ours, naming its).
    bad = _receipt(ar, envelope, **given, kid=es.signing_kid)
    with pytest.raises(Unrecoverable, match="signature does not verify"):
        _apply(fresh_ar, _entry("sent", envelope, bad))
    # Ours to another peer than the one listing it.
    elsewhere = _sealed(ar, "AR/MPF", es, "FR/MJ")
    with pytest.raises(Unrecoverable, match="not one of ours to this peer"):
        _apply(fresh_ar, _entry("sent", elsewhere, _receipt(es, elsewhere, **given)))
    assert _stored(fresh_ar, msg_id) is None
    receipt = _receipt(es, envelope, **given)
    assert _apply(fresh_ar, _entry("sent", envelope, receipt)) == RECOVERED
    # As delivered, with the peer's receipt: nothing is queued to be sent again.
    assert _stored(fresh_ar, msg_id) == {
        "direction": "outbound",
        "status": "delivered",
        "receipt": receipt.body,
        "outbox": "delivered",
    }
    assert _apply(fresh_ar, _entry("sent", envelope, receipt)) == ALREADY


def test_within_one_second_a_message_goes_after_the_one_it_follows() -> None:
    def entry(msg_id: str, at: str, follows: str | None = None) -> Entry:
        return Entry("received", msg_id, at, follows, "r", None, None, False)

    first, second = "2026-12-01T10:00:00Z", "2026-12-01T10:00:01Z"
    listed = [
        entry("a", first),
        entry("b", second, follows="c"),  # listed first (its id), made after c
        entry("c", second, follows="a"),
        entry("d", second, follows="b"),
    ]
    assert [item.msg_id for item in listing.in_order(listed)] == ["a", "c", "b", "d"]


def test_the_listing_pages_through_ties_without_losing_or_repeating_one(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.recovery import serve
    from app.recovery.request import sign_request

    ids = [fresh_ar.receive_request() for _ in range(7)]  # most within one second
    monkeypatch.setattr(serve, "PAGE_ENTRIES", 3)
    es = fresh_ar.peer_keys
    seen: list[str] = []
    after = None
    for _ in range(10):
        body = sign_request(
            es.signing,
            sig_kid=es.signing_kid,
            from_authority="ES/MJ",
            to_authority="AR/MPF",
            since=utc_now() - timedelta(hours=1),
            after=after,
            created_at=utc_now(),
        )
        page = fresh_ar.http.post("/p2p/v1/recovery", json=body)
        assert page.status_code == 200, page.text
        seen += [entry["msg_id"] for entry in page.json()["entries"]]
        after = page.json()["next"]
        if after is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen)) == 7


def test_a_message_not_taken_back_holds_back_the_rest_of_its_request(
    fresh_ar: Harness,
) -> None:
    """A message that cannot be taken back (here, listed without its envelope) holds back
    the later messages of its request, as a delivery waits for the one before it."""
    ar, es = fresh_ar.node.keys, fresh_ar.peer_keys
    envelope = _sealed(es, "ES/MJ", ar, "AR/MPF")
    later = _entry("received", envelope, _receipt(ar, envelope, sender="ES/MJ", recipient="AR/MPF"))
    streamed = Entry(
        role="received",
        msg_id="f" * 32,
        at="2000-01-01T00:00:00Z",  # before the other
        in_reply_to=None,
        request_id=later.request_id,
        wire=None,
        receipt=None,
        streamed=True,
    )
    summary = recover.Summary()
    with httpx.Client(timeout=5) as http:
        recover._take_all(fresh_ar.node, http, [later, streamed], "ES/MJ", summary, set(), None)
    assert [entry.msg_id for entry in summary.failed] == [streamed.msg_id, later.msg_id]
    assert "without its envelope" in (streamed.error or "")
    assert later.error == "held back: an earlier message of its request was not taken back"
    assert _stored(fresh_ar, later.msg_id) is None


def test_pages_are_taken_in_our_order_with_ties_and_holds_across_their_boundaries(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop over a listing's pages (pure ordering logic: the pages and each entry's
    taking are stood in for; what taking checks is shown above)."""

    def entry(name: str, at: str, request: str) -> Entry:
        return Entry(
            "received", name * 32, f"2026-12-01T10:00:0{at}Z", None, request * 32, {}, None, False
        )

    a, b, c = entry("a", "1", "1"), entry("b", "2", "2"), entry("c", "3", "3")
    d, e, f = entry("d", "3", "3"), entry("e", "2", "4"), entry("f", "4", "4")
    g = entry("9", "5", "2")  # of b's request, on the next page
    c.in_reply_to = d.msg_id  # c follows d, within the second the page boundary cut
    listed = [[a, b, c], [d, e, f, g]]  # the second 3 cut by the page boundary; e out of order
    monkeypatch.setattr(recover, "pages", lambda *args, **kwargs: iter(listed))
    monkeypatch.setattr(recover, "here", lambda node, entry: False)
    taken: list[str] = []

    def taking(node: object, http: object, entry: Entry, **where: str) -> str:
        if entry is b:
            raise Unrecoverable("refused")
        taken.append(entry.msg_id[0])
        return RECOVERED

    monkeypatch.setattr(recover, "apply", taking)
    with httpx.Client(timeout=5) as http:
        summary = recover.recover(
            fresh_ar.node, http, peer="ES/MJ", since=utc_now(), actor="operator:test"
        )
    # c waited for d (same second, next page), which it follows; e came after its second had
    # passed, and holds back f, of its request; b's failure held back g on the next page.
    assert taken == ["a", "d", "c"]
    held = "held back: an earlier message of its request was not taken back"
    assert {item.msg_id[0]: item.error for item in summary.failed} == {
        "e": "listed after the messages of 2026-12-01T10:00:03Z, but taken before",
        "f": held,
        "b": "refused",
        "9": held,
    }
    assert (summary.listed, summary.received) == (7, 3)


def test_a_streamed_message_the_backup_holds_is_here_already(fresh_ar: Harness) -> None:
    """The listing starts before the backup: a message with streamed evidence the restored
    node holds is counted as here, and holds nothing back (from an operator's walkthrough:
    it was refused, and blocked its request)."""
    request_id = fresh_ar.receive_request()
    streamed = Entry(
        role="received",
        msg_id=request_id,
        at="2000-01-01T00:00:00Z",
        in_reply_to=None,
        request_id=request_id,
        wire=None,
        receipt=None,
        streamed=True,
    )
    summary = recover.Summary()
    with httpx.Client(timeout=5) as http:
        recover._take_all(fresh_ar.node, http, [streamed], "ES/MJ", summary, set(), None)
    assert (summary.already, summary.failed) == (1, [])


def test_our_rotated_away_signing_key_vouches_only_for_what_it_signed_before(
    tmp_path: Path,
) -> None:
    """A key of ours rotated away (or stolen since) proves nothing dated after its rotation,
    but for the clock skew: a running node signs with it until it loads the new one."""
    from app.crypto.keys import rotate_keys, save_keys

    save_keys(tmp_path, NodeKeys.generate())
    old, new = rotate_keys(tmp_path, authority_id="AR/MPF", passphrase=None, overlap=timedelta(1))
    rotated_at = new.rotations[-1].rotated_at
    skew = timedelta(minutes=5)
    kid = old.signing_kid
    assert take.own_key_then(new, kid, rotated_at - timedelta(days=1), skew) == (old.signing_public)
    assert take.own_key_then(new, kid, rotated_at + skew, skew) == old.signing_public
    with pytest.raises(Unrecoverable, match="rotated away"):
        take.own_key_then(new, kid, rotated_at + skew + timedelta(seconds=1), skew)
    assert take.own_key_then(new, new.signing_kid, utc_now(), skew) == new.signing_public
    with pytest.raises(Unrecoverable, match="does not hold"):
        take.own_key_then(new, "0" * 32, utc_now(), skew)


class _Peer(http.server.BaseHTTPRequestHandler):
    """A peer answering every part request with the bytes it was given (the attacker)."""

    answer = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", str(len(self.answer)))
        self.end_headers()
        self.wfile.write(self.answer)

    def log_message(self, *args: object) -> None:
        pass


def test_a_streamed_part_is_kept_only_as_its_signed_header_names_it(fresh_ar: Harness) -> None:
    """Fetched from the peer, a part is published in the blob store only if its length and
    SHA-256 are the signed header's; one the store holds already is not asked for."""
    from types import SimpleNamespace

    from app.crypto.envelope import PartInfo
    from app.evidence.node_store import blob_store
    from app.recovery.parts import PartUnavailable, fetch_parts

    good = b"ciphertext of the part"
    info = PartInfo(1, b"", len(good), hashlib.sha256(good).hexdigest())
    header = SimpleNamespace(msg_id="e" * 32, parts=[PartInfo(0, b"", 1, "0" * 64), info])
    store = blob_store(fresh_ar.node.settings)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for answer, said in ((b"x" * len(good), "not the one"), (good + b"!", "longer")):
            _Peer.answer = answer
            with pytest.raises(PartUnavailable, match=said):
                fetch_parts(fresh_ar.node, peer="ES/MJ", peer_url=url, header=header)
            assert not store.exists(info.sha256)
            assert not store.upload_exists(f"recover-{'e' * 32}-1")
        _Peer.answer = good
        fetch_parts(fresh_ar.node, peer="ES/MJ", peer_url=url, header=header)
        assert store.exists(info.sha256)
        _Peer.answer = b"never asked"  # held now: not fetched again
        blob = store.blobs / info.sha256[:2] / info.sha256[2:4] / info.sha256
        os.utime(blob, (0, 0))  # as a blob that outlived its database would be: old
        fetch_parts(fresh_ar.node, peer="ES/MJ", peer_url=url, header=header)
        with store.open(info.sha256) as reader:
            assert reader.read() == good
        # Marked as new, so that the sweep of unreferenced blobs spares it until it is named.
        assert blob.stat().st_mtime > time.time() - 60
    finally:
        server.shutdown()
        server.server_close()


def test_a_streamed_message_is_taken_back_and_the_transfer_the_backup_caught_goes(
    fresh_ar: Harness,
) -> None:
    """A peer's message with streamed evidence, whose transfer was under way when the backup
    was taken: taken back with our receipt, its part fetched and checked, and the transfer's
    row gone (it counted against the peer's transfers until it expired)."""
    from app.evidence.node_store import blob_store
    from app.models import InboundTransfer

    wire, msg_id, _href = fresh_ar.announce_streamed()  # the transfer the backup caught
    with unit_of_work(fresh_ar.node.sessions) as session:
        assert session.scalar(select(InboundTransfer.id).where(InboundTransfer.msg_id == msg_id))
    envelope = WireEnvelope(
        header=base64.b64decode(wire["header"]),
        signature=base64.b64decode(wire["signature"]),
        parts=[base64.b64decode(part) for part in wire["parts"]],
    )
    receipt = _receipt(fresh_ar.node.keys, envelope, sender="ES/MJ", recipient="AR/MPF")
    entry = _entry("received", envelope, receipt)
    entry.streamed = True
    entry.wire = {**wire, "parts": wire["parts"][:1]}  # as listed: its manifest alone
    _Peer.answer = envelope.parts[1]  # the peer holds the part
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with httpx.Client(timeout=5) as client:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            assert take.apply(fresh_ar.node, client, entry, peer="ES/MJ", peer_url=url) == (
                RECOVERED
            )
    finally:
        server.shutdown()
        server.server_close()
    assert _stored(fresh_ar, msg_id) == {
        "direction": "inbound",
        "status": "delivered",
        "receipt": receipt.body,
        "outbox": None,
    }
    with unit_of_work(fresh_ar.node.sessions) as session:
        assert (
            session.scalar(select(InboundTransfer.id).where(InboundTransfer.msg_id == msg_id))
            is None
        )
    digest = hashlib.sha256(envelope.parts[1]).hexdigest()
    assert blob_store(fresh_ar.node.settings).exists(digest)
