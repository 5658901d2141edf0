"""A pinned peer cannot fill this node's disk with transfers it never finishes: past its
number of transfers under way (or their declared bytes), a new announcement waits (429,
retried by its sender) until some complete or expire. One under way is answered as before."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import delete

from app.audit.log import record
from app.crypto.encoding import b64d, utc_now
from app.crypto.envelope import Attachment, Recipient, seal
from app.crypto.randomness import SystemRandomness
from app.db import unit_of_work
from app.evidence.inbound import get_transfer
from app.models import InboundTransfer
from tests.requests.conftest import Harness, example_document

ANNOUNCE = "/p2p/v1/evidence/envelopes"


def _announcement(
    ar: Harness, size: int = 64, ttl: timedelta = timedelta(days=1)
) -> dict[str, Any]:
    """A new request from ES/MJ with one attachment, as announced: its header and manifest."""
    wire = _whole(ar, size, ttl)
    wire["parts"] = wire["parts"][:1]
    return wire


def _whole(ar: Harness, size: int = 64, ttl: timedelta = timedelta(days=1)) -> dict[str, Any]:
    """A new request from ES/MJ with one attachment, every part of it."""
    envelope = seal(
        sender_keys=ar.peer_keys,
        sender_authority="ES/MJ",
        recipient=Recipient("AR/MPF", ar.node.keys.encryption_public),
        content={"kind": "request", "document": example_document()},
        attachments=[Attachment("disk.img", "application/octet-stream", b"x" * size)],
        conversation_id=None,
        in_reply_to=None,
        created_at=utc_now(),
        ttl=ttl,
        randomness=SystemRandomness(),
    )
    return envelope.to_wire()


def test_a_peer_has_only_so_many_transfers_under_way(fresh_ar: Harness) -> None:
    ar = fresh_ar
    limit = 3
    ar.node.settings = replace_settings(ar, max_inbound_transfers_per_peer=limit)
    first = _announcement(ar)
    for wire in [first] + [_announcement(ar) for _ in range(limit - 1)]:
        assert ar.http.post(ANNOUNCE, json=wire).status_code == 202
    refused_before = len(ar.audit("envelope.refused"))
    refused = ar.http.post(ANNOUNCE, json=_announcement(ar))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "too_many_transfers"
    assert int(refused.headers["retry-after"]) > 0
    # Flow control, not a refusal: neither audited nor counted against the peer's address
    # (whose part uploads for the transfers under way must go on).
    assert len(ar.audit("envelope.refused")) == refused_before
    # One already under way is answered as before (its sender resumes it).
    assert ar.http.post(ANNOUNCE, json=first).status_code == 202


def test_a_transfer_whose_envelope_was_then_posted_whole_is_under_way_no_more(
    fresh_ar: Harness,
) -> None:
    """From review: a sender may carry an envelope it announced as a whole post instead
    (protocol.md §8.5). Its transfer stayed, counted as under way until it expired (days):
    a peer that did so `limit` times had every new announcement refused (429), and HEAD
    still asked for the parts of an envelope accepted long before."""
    ar = fresh_ar
    limit = 2
    ar.node.settings = replace_settings(ar, max_inbound_transfers_per_peer=limit)
    carried_whole = [_whole(ar) for _ in range(limit)]
    for wire in carried_whole:
        announced = ar.http.post(ANNOUNCE, json={**wire, "parts": wire["parts"][:1]})
        assert announced.status_code == 202, announced.text
        accepted = ar.http.post("/p2p/v1/envelopes", json=wire)
        assert accepted.status_code == 201, accepted.text
    msg_id = json.loads(b64d(carried_whole[0]["header"]))["msg_id"]

    head = ar.http.head(f"{ANNOUNCE}/{msg_id}/parts/1")
    assert (head.status_code, head.headers.get("entraide-error")) == (404, "unknown_transfer")
    assert ar.http.post(ANNOUNCE, json=_announcement(ar)).status_code == 202
    # Announced again, it is answered with the receipt of the envelope posted whole.
    again = ar.http.post(
        ANNOUNCE, json={**carried_whole[0], "parts": carried_whole[0]["parts"][:1]}
    )
    assert again.status_code == 200, again.text


def test_a_peer_has_only_so_many_bytes_under_way(fresh_ar: Harness) -> None:
    ar = fresh_ar
    ar.node.settings = replace_settings(ar, max_inbound_bytes_per_peer=3000)
    # One transfer is always taken, larger than the budget as it may be (else it waited
    # for ever, answered 429 with no other transfer under way).
    alone = _announcement(ar, 5000)
    assert ar.http.post(ANNOUNCE, json=alone).status_code == 202
    with unit_of_work(ar.node.sessions) as session:
        session.execute(delete(InboundTransfer))
    assert ar.http.post(ANNOUNCE, json=_announcement(ar, 1000)).status_code == 202
    refused = ar.http.post(ANNOUNCE, json=_announcement(ar, 2500))
    assert (refused.status_code, refused.json()["error"]) == (429, "too_many_transfers")
    assert ar.http.post(ANNOUNCE, json=_announcement(ar, 1000)).status_code == 202


def test_a_lapsed_transfer_counts_until_the_sweep_may_remove_what_it_staged(
    fresh_ar: Harness,
) -> None:
    """From review: expired transfers were not counted, though what they received stays on
    disk until the sweep (evidence_orphan_hours later): a peer letting short-lived transfers
    lapse could stage without limit. Their bytes count; their number does not (transfers
    that lapsed while the node was down must not keep new ones out for days)."""
    ar = fresh_ar
    ar.node.settings = replace_settings(ar, max_inbound_bytes_per_peer=3000)
    lapsing = _announcement(ar, 2000, ttl=timedelta(seconds=5))  # times are to the second
    assert ar.http.post(ANNOUNCE, json=lapsing).status_code == 202
    time.sleep(5.5)  # it has expired: no part can arrive for it any more
    refused = ar.http.post(ANNOUNCE, json=_announcement(ar, 2000))
    assert (refused.status_code, refused.json()["error"]) == (429, "too_many_transfers")
    assert "1 lapsed ones await removal" in refused.json()["detail"]
    # Within the bytes left, and whatever the number of lapsed ones: taken.
    ar.node.settings = replace_settings(
        ar, max_inbound_bytes_per_peer=3000, max_inbound_transfers_per_peer=1
    )
    taken = ar.http.post(ANNOUNCE, json=_announcement(ar, 500))
    assert taken.status_code == 202, taken.text
    # Once the sweep may remove it, it counts no more.
    ar.node.settings = replace_settings(
        ar, max_inbound_transfers_per_peer=16, evidence_orphan_hours=0
    )
    swept = ar.http.post(ANNOUNCE, json=_announcement(ar, 2000))
    assert swept.status_code == 202, swept.text


def replace_settings(ar: Harness, **changes: Any) -> Any:
    return ar.node.settings.model_copy(update=changes)


def test_a_whole_post_while_a_part_completes_waits_its_turn(fresh_ar: Harness) -> None:
    """From review: the transfer's row was deleted after the envelope's audit entries, which
    lock the audit log's head, while a part completing locks the transfer first, then the
    head: on PostgreSQL the two deadlocked (the whole post answered 503). The row is now
    locked first, as the part's completion does."""
    ar = fresh_ar
    wire = _whole(ar)
    assert ar.http.post(ANNOUNCE, json={**wire, "parts": wire["parts"][:1]}).status_code == 202
    msg_id = json.loads(b64d(wire["header"]))["msg_id"]
    locked = threading.Event()
    ended: list[str] = []

    def part_completes() -> None:  # as inbound.part_received: the transfer, then the log
        with unit_of_work(ar.node.sessions) as session:
            get_transfer(session, msg_id, lock=True)
            locked.set()
            time.sleep(1.0)
            record(session, actor="peer:ES/MJ", action="evidence.part_received", msg_id=msg_id)
        ended.append("committed")

    part = threading.Thread(target=part_completes)
    part.start()
    try:
        assert locked.wait(10)
        whole = ar.http.post("/p2p/v1/envelopes", json=wire)
    finally:
        part.join()

    assert whole.status_code == 201, whole.text
    assert ended == ["committed"]
