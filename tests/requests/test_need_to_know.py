"""Need-to-know: a restricted request exists only for the officers named on it, and every
read of it, allowed or refused, is an audit entry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.models import ApiClient, CaseFile
from app.node import Node
from app.requests import access
from tests.requests.conftest import EXAMPLE, Harness

REFUSED = "refused_need_to_know"
NEED_TO_KNOW = {
    "confidential": True,
    "level": "need_to_know",
    "use_limitation": "Only in proceedings DP 1873/2026.",
}


def _officers(ar: Harness, request_id: str, names: list[str]) -> Any:
    return ar.http.put(
        f"/api/v1/admin/requests/{request_id}/officers",
        # As JSON escapes them: httpx's own encoding refuses a lone surrogate.
        headers={**ar.as_("admin"), "content-type": "application/json"},
        content=json.dumps({"officers": names}),
    )


def _listed(ar: Harness, client: str) -> set[str]:
    items = ar.get("/api/v1/requests", client, limit=200).json()["items"]
    return {item["id"] for item in items}


def test_a_restricted_request_is_invisible_to_officers_not_named_on_it(ar: Harness) -> None:
    request_id = ar.receive_request(confidentiality=NEED_TO_KNOW)
    path = f"/api/v1/requests/{request_id}"
    attachment = f"{path}/messages/{request_id}/attachments/1"

    # Marked need-to-know by the requesting authority: it arrives seen by nobody.
    for client in ("officer", "alice", "bob"):
        response = ar.get(path, client)
        assert (response.status_code, response.json()["error"]) == (404, "unknown_request")
        assert request_id not in _listed(ar, client)
    restricted = ar.get("/api/v1/admin/requests/restricted", "admin").json()
    assert [
        (r["id"], r["handling"], r["officers"]) for r in restricted if r["id"] == request_id
    ] == [(request_id, "need_to_know", [])]

    named = _officers(ar, request_id, ["alice"])
    assert named.status_code == 200, named.text
    assert named.json()["officers"] == ["alice"]
    assert named.json()["restricted"] is True

    reads_before = ar.audit("request.read")
    allowed = ar.get(path, "alice")
    assert allowed.status_code == 200
    assert allowed.json()["restricted"] is True
    assert allowed.json()["handling"] == "need_to_know"
    refused = ar.get(path, "bob")
    assert refused.status_code == 404
    # Exactly what an id that was never used gets: nothing tells bob the request exists.
    never = ar.get("/api/v1/requests/" + "0" * 32, "bob")
    assert (refused.json(), refused.status_code) == (never.json(), never.status_code)
    assert ar.audit("request.read")[len(reads_before) :] == [
        ("client:alice", "ok", request_id),
        ("client:bob", REFUSED, request_id),
    ]

    assert request_id in _listed(ar, "alice")
    assert request_id not in _listed(ar, "bob")
    assert ar.get(attachment, "alice").content == b"letter of request"
    assert ar.get(attachment, "bob").status_code == 404
    ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
    assert ar.post(f"{path}/messages", ack, "bob").status_code == 404
    assert ar.post(f"{path}/messages", ack, "alice").status_code == 201
    assert ar.audit("attachment.downloaded")[-2:] == [
        ("client:alice", "ok", request_id),
        ("client:bob", REFUSED, request_id),
    ]
    assert ar.audit("message.submitted")[-2:] == [
        ("client:bob", REFUSED, request_id),
        ("client:alice", "ok", request_id),
    ]
    assert ar.audit("request.restricted")[-1] == ("client:admin", "ok", request_id)

    # The requesting authority's marking stands: the list can change, not be emptied.
    lifted = _officers(ar, request_id, [])
    assert (lifted.status_code, lifted.json()["error"]) == (409, "restriction_required")
    moved = _officers(ar, request_id, ["bob"])
    assert moved.json()["officers"] == ["bob"]
    assert ar.get(path, "bob").status_code == 200
    assert ar.get(path, "alice").status_code == 404


def test_an_administrator_may_restrict_any_request_and_lift_it(ar: Harness) -> None:
    request_id = ar.receive_request()
    path = f"/api/v1/requests/{request_id}"
    assert ar.get(path, "bob").json()["restricted"] is False
    assert _officers(ar, request_id, ["alice", "alice"]).json()["officers"] == ["alice"]
    assert ar.get(path, "bob").status_code == 404
    lifted = _officers(ar, request_id, [])
    assert lifted.json() | {"created_at": None} == {
        "id": request_id,
        "direction": "inbound",
        "peer": "ES/MJ",
        "handling": "no_tipping_off",
        "restricted": False,
        "officers": [],
        "created_at": None,
    }
    assert ar.get(path, "bob").status_code == 200
    assert ar.audit("request.unrestricted")[-1] == ("client:admin", "ok", request_id)


def test_a_request_this_node_marked_need_to_know_can_be_unrestricted_here(
    ar: Harness,
) -> None:
    """From review: at the requesting node, a request its officer marked need-to-know starts
    unrestricted; once an administrator restricted it there, `[]` answered 409
    `restriction_required` for good. That rule is the receiving node's."""
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["document"]["confidentiality"]["level"] = "need_to_know"
    sent = ar.post("/api/v1/requests", body)
    assert sent.status_code == 201, sent.text
    request_id = sent.json()["id"]
    path = f"/api/v1/requests/{request_id}"
    assert ar.get(path, "bob").json()["restricted"] is False
    assert _officers(ar, request_id, ["alice"]).json()["restricted"] is True
    assert ar.get(path, "bob").status_code == 404
    lifted = _officers(ar, request_id, [])
    assert lifted.status_code == 200, lifted.text
    assert (lifted.json()["handling"], lifted.json()["restricted"]) == ("need_to_know", False)
    assert ar.get(path, "bob").status_code == 200


def test_a_client_named_before_the_naming_rule_can_still_be_named_an_officer(
    ar: Harness,
) -> None:
    """From review: names are checked at `clients create` since 2026-11-30, and the same
    rule on the officers list refused a client an earlier release had named "Jean Dupont"
    (422): such an officer could never be given a restricted request. The list takes any
    active officer's name; a lookalike of one (`ofﬁcer`, ligature ﬁ) names no client."""
    with unit_of_work(ar.node.sessions) as session:
        session.add(
            ApiClient(
                name="Jean Dupont",
                token_hash="0" * 64,
                roles="officer",
                created_at=utc_now(),
            )
        )
    request_id = ar.receive_request()
    named = _officers(ar, request_id, ["Jean Dupont"])
    assert named.status_code == 200, named.text
    assert named.json()["officers"] == ["Jean Dupont"]
    lookalike = _officers(ar, request_id, ["of\ufb01cer"])
    assert (lookalike.status_code, lookalike.json()["error"]) == (400, "unknown_officer")


def test_only_active_officers_can_be_named_and_only_by_an_administrator(ar: Harness) -> None:
    request_id = ar.receive_request()
    # A NUL: no client's name, said so on PostgreSQL too (from review: invalid_value there).
    for names in (["auditor"], ["admin"], ["nobody"], ["alice", "nobody"], ["a\x00b"]):
        response = _officers(ar, request_id, names)
        assert (response.status_code, response.json()["error"]) == (400, "unknown_officer")
    surrogate = _officers(ar, request_id, ["a\ud800b"])  # no text column can hold it
    assert (surrogate.status_code, surrogate.json()["error"]) == (422, "invalid_request")
    assert ar.get(f"/api/v1/admin/requests/{request_id}/officers", "admin").json()["officers"] == []
    as_officer = ar.http.put(
        f"/api/v1/admin/requests/{request_id}/officers",
        headers=ar.as_("alice"),
        json={"officers": ["alice"]},
    )
    assert as_officer.status_code == 403
    missing = _officers(ar, "0" * 32, ["alice"])
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_request")


def test_a_submitted_draft_follows_its_request_restriction(ar: Harness) -> None:
    """A draft's id is its request's: once the request is restricted to other officers, its
    author no longer reads it through the draft routes either (refused as unknown, audited)."""
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [{"name": "e.bin", "media_type": "application/octet-stream", "size": 3}]
    created = ar.post("/api/v1/evidence/drafts", body, "alice")
    assert created.status_code == 201, created.text
    draft_id, href = created.json()["id"], created.json()["attachments"][0]["href"]
    sent = ar.http.patch(href, content=b"abc", headers={**ar.as_("alice"), "upload-offset": "0"})
    assert sent.status_code == 204, sent.text
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", {}, "alice").status_code == 201
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}", "alice").status_code == 200

    assert _officers(ar, draft_id, ["bob"]).status_code == 200
    read = ar.get(f"/api/v1/evidence/drafts/{draft_id}", "alice")
    never = ar.get(f"/api/v1/evidence/drafts/{'0' * 32}", "alice")
    # What an id never used gets on these routes: nothing says a request has this id.
    assert (read.status_code, read.json()) == (never.status_code, never.json())
    assert (read.status_code, read.json()["error"]) == (404, "unknown_draft")
    assert ar.http.head(href, headers=ar.as_("alice")).status_code == 404
    assert ar.audit("evidence.draft_read")[-2:] == [
        ("client:alice", REFUSED, draft_id),
        ("client:alice", REFUSED, draft_id),
    ]
    # Audited where it was refused, and not a second time as a refused call.
    assert [r for r in ar.audit("api.refused") if r[2] == draft_id] == []


@pytest.mark.parametrize("route", ["read", "message", "attachment"])
def test_a_restriction_made_just_after_the_check_still_holds(
    ar: Harness, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The route checks visibility in a transaction of its own, then reads in another: an
    administrator's restriction committed between the two let an officer no longer named
    read the request (and its evidence) all the same."""
    request_id = ar.receive_request()
    real = access.check_visible

    def restricted_right_after(node: Node, **arguments: Any) -> None:
        real(node, **arguments)  # bob may see it: not restricted yet
        with unit_of_work(node.sessions) as session:
            case = session.get(CaseFile, request_id)
            assert case is not None
            access.restrict(session, case=case, officers=["alice"], actor="client:admin")

    monkeypatch.setattr(access, "check_visible", restricted_right_after)
    path = f"/api/v1/requests/{request_id}"
    if route == "read":
        response = ar.get(path, "bob")
    elif route == "message":
        ack = {"document": {"type": "acknowledgement", "text": "Registered."}}
        response = ar.post(f"{path}/messages", ack, "bob")
    else:
        response = ar.get(f"{path}/messages/{request_id}/attachments/1", "bob")
    assert (response.status_code, response.json()["error"]) == (404, "unknown_request")
    monkeypatch.undo()
    seen = ar.get(path, "alice")
    assert seen.status_code == 200
    assert seen.json()["status"] == "delivered"  # bob's acknowledgement was not sent


def test_requests_waiting_for_names_are_listed_first(fresh_ar: Harness) -> None:
    """The list stops at 500: newest first, one that waited for names longest could fall
    off it, the very request the list is for."""
    waiting = fresh_ar.receive_request(confidentiality=NEED_TO_KNOW)
    named = fresh_ar.receive_request(confidentiality=NEED_TO_KNOW)
    assert _officers(fresh_ar, named, ["alice"]).status_code == 200
    listed = fresh_ar.get("/api/v1/admin/requests/restricted", "admin").json()
    assert [(r["id"], r["officers"]) for r in listed] == [(waiting, []), (named, ["alice"])]
