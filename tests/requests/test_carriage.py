"""One envelope, two carriages: a sender may post inline an envelope whose streamed transfer
it had begun. The transfer then has nothing more to receive and goes (left, it counted against
the peer's transfers under way for days; tests/requests/test_inbound_budget.py): a part sent
for it is `404 unknown_transfer`, and the announcement its sender then makes again is answered
with the receipt of the envelope posted whole. It used to be refused (409
unknown_conversation for a request, and for a message the unique message id, a 500 on every
retry), though the envelope had been accepted."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select

from app.crypto.encoding import b64d, b64e, parse_time, utc_now
from app.crypto.envelope import Attachment, Recipient, WireEnvelope, seal
from app.crypto.keys import NodeKeys
from app.crypto.part_put import HEADER as PART_PUT_HEADER
from app.crypto.part_put import sign_part_put
from app.crypto.randomness import SystemRandomness
from app.db import unit_of_work
from app.evidence.stream import CIPHER_CHUNK
from app.models import AuditEntry
from tests.requests.conftest import Harness, example_document
from tests.requests.test_stalled_bodies import _stall


def test_an_envelope_received_inline_during_its_transfer_is_receipted_once(
    fresh_ar: Harness,
) -> None:
    ar = fresh_ar
    envelope = ar._seal({"kind": "request", "document": example_document()}, None, None)
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    announced = _announce(ar, wire)
    assert announced.status_code == 202, announced.text
    inline = ar.post_envelope(envelope)
    assert inline.status_code == 201, inline.text
    part = b64d(wire["parts"][1])
    last = _put_part(ar, msg_id, part)
    assert (last.status_code, last.json()["error"]) == (404, "unknown_transfer"), last.text
    again = _announce(ar, wire)  # as its sender does on that answer
    assert (again.status_code, again.json()) == (200, inline.json())  # the one receipt
    assert ar.messages(msg_id) == 1
    # The repeat is on record, as a repeat posted whole is.
    assert [actor for actor, _, _ in ar.audit("envelope.repeated")] == ["peer:ES/MJ"]


def test_bad_parts_from_one_address_are_counted_and_throttled(fresh_ar: Harness) -> None:
    ar = fresh_ar
    ar.node.settings.p2p_refusal_limit = 3  # this test's node only
    envelope = ar._seal({"kind": "request", "document": example_document()}, None, None)
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    announced = _announce(ar, wire)
    assert announced.status_code == 202, announced.text
    garbage = bytes(len(b64d(wire["parts"][1])))  # the right length, not the right bytes
    statuses = [_put_part(ar, msg_id, garbage).status_code for _ in range(5)]
    assert statuses[:3] == [400, 400, 400]
    assert statuses[-1] == 429  # as for any refused envelope from that address
    assert len(ar.audit("envelope.refused")) == 3  # then only counted


def test_a_bad_chunk_from_anyone_keeps_the_chunks_stored_before_it(fresh_ar: Harness) -> None:
    ar = fresh_ar
    evidence = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three chunks
    envelope = _request_from_es(
        ar, [Attachment("ledger.bin", "application/octet-stream", evidence)]
    )
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    url = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    part = b64d(wire["parts"][1])
    announced = _announce(ar, wire)
    assert announced.status_code == 202, announced.text
    two = 2 * CIPHER_CHUNK
    progress = _put_part(ar, msg_id, part[:two])
    assert progress.headers["upload-offset"] == str(two)  # the sender's progress
    refused = _put_part(ar, msg_id, bytes(len(part) - two), two)  # zeros, from anyone
    assert (refused.status_code, refused.json()["error"]) == (400, "decrypt_failed")
    assert ar.http.head(url).headers["upload-offset"] == str(two)  # was 0: sent again
    done = _put_part(ar, msg_id, part[two:], two)
    assert done.status_code == 201, done.text
    # The receiver was kept as it was, not rebuilt by reading back and decrypting every stored
    # chunk (up to a part's 64 GiB, for one bad chunk from anyone): it completed the part
    # from where it was first opened.
    assert _part_received_from(ar) == [0]


def test_a_bad_chunk_within_the_senders_own_request_keeps_the_receiver(fresh_ar: Harness) -> None:
    ar = fresh_ar
    evidence = bytes(range(256)) * (14 * 1024)  # 3.5 MiB: four chunks
    envelope = _request_from_es(
        ar, [Attachment("ledger.bin", "application/octet-stream", evidence)]
    )
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    part = b64d(wire["parts"][1])
    assert _announce(ar, wire).status_code == 202
    one, three = CIPHER_CHUNK, 3 * CIPHER_CHUNK
    assert _put_part(ar, msg_id, part[:one]).headers["upload-offset"] == str(one)
    # Two good chunks, then one flipped bit in the third: the good ones are stored.
    damaged = bytearray(part[one:])
    damaged[2 * CIPHER_CHUNK + 5] ^= 1
    refused = _put_part(ar, msg_id, bytes(damaged), one)
    assert (refused.status_code, refused.json()["error"]) == (400, "decrypt_failed")
    url = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    assert ar.http.head(url).headers["upload-offset"] == str(three)
    done = _put_part(ar, msg_id, part[three:], three)
    assert done.status_code == 201, done.text
    assert _part_received_from(ar) == [0]
    assert ar.messages(msg_id) == 1


def _part_received_from(ar: Harness) -> list[int]:
    """Where the receiver that completed each part was opened (rebuilt from stored chunks)."""
    with unit_of_work(ar.node.sessions) as session:
        entries = session.scalars(
            select(AuditEntry.entry)
            .where(AuditEntry.action == "evidence.part_received")
            .order_by(AuditEntry.idx)
        ).all()
    return [json.loads(entry)["details"]["from_offset"] for entry in entries]


def test_a_part_is_taken_from_its_sender_alone(fresh_ar: Harness) -> None:
    """Anyone who knows a msg_id (it is in every part URL, so in access logs) could hold a
    part busy with a trickled body, or send it bad chunks. A PUT is signed by the envelope's
    sender (protocol.md section 8.5), refused otherwise before a byte of its body is read,
    once the sender has signed one (before, it may run a release without signatures)."""
    ar = fresh_ar
    envelope = _request_from_es(
        ar, [Attachment("ledger.bin", "application/octet-stream", bytes(3 * CIPHER_CHUNK))]
    )
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    part = b64d(wire["parts"][1])
    assert _announce(ar, wire).status_code == 202
    url = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    first = _put_part(ar, msg_id, part[:CIPHER_CHUNK])  # signed
    assert first.headers["upload-offset"] == str(CIPHER_CHUNK), first.text
    at = CIPHER_CHUNK
    stranger = NodeKeys.generate().signing
    unsigned = {"upload-offset": str(at)}
    refusals = {
        "no signature": unsigned,
        "not base64": {**unsigned, PART_PUT_HEADER: "not base64!"},
        "a stranger's key": {
            **unsigned,
            PART_PUT_HEADER: sign_part_put(stranger, envelope.envelope_hash, 1, at),
        },
        "another offset": ar.signed_put(msg_id, 0) | unsigned,
        "another part": ar.signed_put(msg_id, at, index=2) | unsigned,
    }
    # The one that trickles: answered at once, and the part is not held busy meanwhile.
    trickling = _stall(ar, "PUT", url, refusals.pop("no signature"), len(part) - at)
    trickling.settimeout(10)
    answered = b""
    while b"}" not in answered and (received := trickling.recv(65536)):
        answered += received  # the head and the error's body, not the end of the connection
    assert answered.startswith(b"HTTP/1.1 403"), answered
    assert b"bad_part_signature" in answered
    assert b"connection: close" in answered.lower()
    for case, headers in refusals.items():
        refused = ar.http.put(url, content=part[at : at + 100], headers=headers)
        assert (refused.status_code, refused.json()["error"]) == (403, "bad_part_signature"), case
    assert [outcome for _, outcome, _ in ar.audit("envelope.refused")] == ["bad_part_signature"] * 5
    assert ar.http.head(url).headers["upload-offset"] == str(at)
    done = _put_part(ar, msg_id, part[at:], at)  # its sender's, while the trickle goes on
    assert done.status_code == 201, done.text
    trickling.close()


def test_a_sender_that_never_signed_a_part_sends_them_unsigned(fresh_ar: Harness) -> None:
    """A peer on a release from before part signatures: its PUTs are taken, so that
    authorities need not all upgrade at once, until its first signed one."""
    ar = fresh_ar
    first, second = (
        _request_from_es(ar, [Attachment("a.bin", "application/octet-stream", bytes(100))])
        for _ in range(2)
    )
    for envelope in (first, second):
        assert _announce(ar, envelope.to_wire()).status_code == 202
    older = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{_msg_id(first)}/parts/1",
        content=first.parts[1],
        headers={"upload-offset": "0"},
    )
    assert older.status_code == 201, older.text
    assert _signs_parts_since(ar) is None  # what an operator sees during the upgrade
    assert _put_part(ar, _msg_id(second), second.parts[1][:50]).status_code == 204  # signed
    assert _signs_parts_since(ar) is not None
    third = _request_from_es(ar, [Attachment("c.bin", "application/octet-stream", bytes(100))])
    assert _announce(ar, third.to_wire()).status_code == 202
    unsigned = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{_msg_id(third)}/parts/1",
        content=third.parts[1],
        headers={"upload-offset": "0"},
    )
    assert (unsigned.status_code, unsigned.json()["error"]) == (403, "bad_part_signature")


def test_an_operator_may_require_signed_parts_of_every_peer(fresh_ar: Harness) -> None:
    """From an operator's review: a peer pinned today sends its parts unsigned until its
    first signed one, and nothing could require signatures from the first (a transfer's
    message id, in proxy logs, then let anyone feed or hold its parts)."""
    ar = fresh_ar
    ar.node.settings.part_signatures_required = True  # this test's node only
    envelope = _request_from_es(ar, [Attachment("a.bin", "application/octet-stream", bytes(100))])
    assert _announce(ar, envelope.to_wire()).status_code == 202
    assert _signs_parts_since(ar) is None  # never seen signing
    unsigned = ar.http.put(
        f"/p2p/v1/evidence/envelopes/{_msg_id(envelope)}/parts/1",
        content=envelope.parts[1],
        headers={"upload-offset": "0"},
    )
    assert (unsigned.status_code, unsigned.json()["error"]) == (403, "bad_part_signature")
    assert _put_part(ar, _msg_id(envelope), envelope.parts[1]).status_code == 201  # signed


def _signs_parts_since(ar: Harness) -> str | None:
    listed = ar.get("/api/v1/admin/peers", client="admin")
    assert listed.status_code == 200, listed.text
    (es,) = [peer for peer in listed.json() if peer["authority_id"] == "ES/MJ"]
    since: str | None = es["part_signatures_since"]
    return since


def _msg_id(envelope: WireEnvelope) -> str:
    return str(json.loads(envelope.header)["msg_id"])


def test_parts_of_an_expired_transfer_are_refused(fresh_ar: Harness) -> None:
    ar = fresh_ar
    envelope = _request_from_es(
        ar, [Attachment("letter.txt", "text/plain", b"letter of request")], ttl=timedelta(seconds=5)
    )
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    announced = _announce(ar, wire)
    assert announced.status_code == 202, announced.text
    time.sleep(max(0.0, (envelope_expiry(envelope) - utc_now()).total_seconds()) + 0.1)
    late = _put_part(ar, msg_id, b64d(wire["parts"][1]))
    assert (late.status_code, late.json()["error"]) == (400, "expired")
    assert ar.messages(msg_id) == 0
    assert [outcome for _, outcome, _ in ar.audit("envelope.refused")] == ["expired"]


def envelope_expiry(envelope: WireEnvelope) -> datetime:
    return parse_time(json.loads(envelope.header)["expires_at"])


def _request_from_es(
    ar: Harness, attachments: list[Attachment], *, ttl: timedelta = timedelta(days=1)
) -> WireEnvelope:
    """A request from ES/MJ, the harness's peer, with these attachments."""
    return seal(
        sender_keys=ar.peer_keys,
        sender_authority="ES/MJ",
        recipient=Recipient("AR/MPF", ar.node.keys.encryption_public),
        content={"kind": "request", "document": example_document()},
        attachments=attachments,
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now(),
        ttl=ttl,
        randomness=SystemRandomness(),
    )


def _announce(ar: Harness, wire: dict[str, object]) -> httpx.Response:
    """As a sender of streamed evidence does first: the envelope with part 0 only."""
    parts = wire["parts"]
    assert isinstance(parts, list)
    return ar.http.post("/p2p/v1/evidence/envelopes", json={**wire, "parts": parts[:1]})


def _put_part(ar: Harness, msg_id: str, body: bytes, offset: int = 0) -> httpx.Response:
    """Part 1's bytes from `offset`."""
    headers = {**ar.signed_put(msg_id, offset), "content-type": "application/octet-stream"}
    return ar.http.put(
        f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1", content=body, headers=headers
    )


def test_a_last_part_whose_envelope_is_refused_for_now_is_not_sent_again(
    fresh_ar: Harness,
) -> None:
    """The last part arrived whole, but the envelope cannot be accepted yet (it follows a
    message still on its way: 425, tried again later). The part stays counted: the sender's
    next attempt completes the envelope from its announcement, with no byte sent again
    (the whole part was asked for again on every attempt, up to the delivery deadline)."""
    ar = fresh_ar
    request_id = ar.receive_request()
    first = ar.seal_message(request_id, {"type": "status_query", "text": "Any news?"})
    first_id = json.loads(first.header)["msg_id"]
    second = ar.seal_message(
        request_id, {"type": "status_query", "text": "Still none?"}, in_reply_to=first_id
    )
    wire = second.to_wire()
    msg_id = json.loads(second.header)["msg_id"]
    part = b64d(wire["parts"][1])
    assert _announce(ar, wire).status_code == 202
    early = _put_part(ar, msg_id, part)
    assert (early.status_code, early.json()["error"]) == (425, "predecessor_missing")
    # A refusal of the (signed) envelope itself: on record as its sender's.
    assert ar.audit("envelope.refused")[-1] == ("peer:ES/MJ", "predecessor_missing", None)
    held = ar.http.head(f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1")
    assert held.headers["upload-offset"] == str(len(part))  # was 0: all of it again
    assert ar.post_envelope(first).status_code == 201
    again = _announce(ar, wire)
    assert again.status_code == 201, again.text  # accepted, nothing more to send
    assert ar.messages(request_id) == 3  # the request, then the two queries
    assert len(ar.audit("evidence.part_received")) == 1


def test_asking_for_the_offset_of_no_transfer_is_refused_and_audited(fresh_ar: Harness) -> None:
    """HEAD needs no signature either: anyone who guesses at message ids is on record and
    counted against its address, as for a PUT."""
    ar = fresh_ar
    before = len(ar.audit("envelope.refused"))
    asked = ar.http.head(f"/p2p/v1/evidence/envelopes/{'ab' * 16}/parts/1")
    assert asked.status_code == 404
    assert asked.headers["entraide-error"] == "unknown_transfer"  # HEAD has no body for it
    assert ar.audit("envelope.refused")[before:] == [("peer:unknown", "unknown_transfer", None)]


def test_an_announced_manifest_part_is_held_to_step_26s_codes(ar: Harness) -> None:
    """Part 0 of an announcement, too short or too long: `truncated_part` or
    `malformed_envelope`, as the same part in an inline envelope (a too long one was
    refused as truncated)."""
    wire = ar._seal({"kind": "request", "document": example_document()}, None, None).to_wire()
    parts = wire["parts"]
    assert isinstance(parts, list)
    manifest = b64d(parts[0])
    for changed, code in (
        (manifest[:-1], "truncated_part"),
        (manifest + b"\0", "malformed_envelope"),
    ):
        refused = _announce(ar, {**wire, "parts": [b64e(changed), *parts[1:]]})
        assert (refused.status_code, refused.json()["error"]) == (400, code), refused.text


def test_bytes_past_a_parts_end_are_refused_by_their_framing(fresh_ar: Harness) -> None:
    """Section 8.5: a Content-Length past the part's end is refused before any byte is read
    (413 too_large); a chunked body is read, and refused at the first byte past the end
    (400 malformed_envelope), the whole chunks before it kept."""
    ar = fresh_ar
    evidence = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: three chunks
    envelope = _request_from_es(
        ar, [Attachment("ledger.bin", "application/octet-stream", evidence)]
    )
    wire = envelope.to_wire()
    msg_id = json.loads(envelope.header)["msg_id"]
    url = f"/p2p/v1/evidence/envelopes/{msg_id}/parts/1"
    part = b64d(wire["parts"][1])
    assert _announce(ar, wire).status_code == 202
    declared = _put_part(ar, msg_id, part + b"!")
    assert (declared.status_code, declared.json()["error"]) == (413, "too_large")
    assert declared.headers["connection"] == "close"
    assert ar.http.head(url).headers["upload-offset"] == "0"

    def chunked() -> Iterator[bytes]:
        yield part[:CIPHER_CHUNK]
        time.sleep(0.2)  # read (and stored) before the rest arrives
        yield part[CIPHER_CHUNK:] + b"!"

    refused = ar.http.put(url, content=chunked(), headers=ar.signed_put(msg_id, 0))
    assert (refused.status_code, refused.json()["error"]) == (400, "malformed_envelope")
    kept = int(ar.http.head(url).headers["upload-offset"])
    assert kept >= CIPHER_CHUNK
    assert kept % CIPHER_CHUNK == 0
    assert _put_part(ar, msg_id, part[kept:], kept).status_code == 201
