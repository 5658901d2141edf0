"""The node's real answers, checked against its OpenAPI description (app/openapi.py).

From a review of docs/api.md against a live node: the description left out the `500
stored_envelope_corrupt` of every route that opens what the node stored, the `408
body_timeout` of every route whose body the node reads whole, the octet-stream body of an
evidence upload, and every response header but Retry-After: a client generated from it could
neither send upload bytes nor read where to resume, nor the hash of a download.

Each answer a test here gets from the node (a real server on loopback, real storage damaged
in the database) is checked: its status is listed for its operation, and each header of
CONTRACT_HEADERS it carries is declared for that status.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db import unit_of_work
from app.main import create_app
from app.models import EvidenceDraft, Message, Part, Receipt
from tests.requests.conftest import Harness, example_document

SPEC: dict[str, Any] = create_app(Settings()).openapi()

# The headers a client reads besides the body (lower case, as httpx gives them).
CONTRACT_HEADERS = frozenset(
    {
        "upload-offset",
        "upload-length",
        "upload-complete",
        "idempotent-replayed",
        "x-entraide-sha256",
        "x-entraide-media-type",
        "content-disposition",
        "www-authenticate",
        "retry-after",
        "entraide-error",
        "location",
    }
)
ACK = {"type": "acknowledgement", "text": "Registered."}


def _operation(method: str, path: str) -> dict[str, Any]:
    for template, operations in SPEC["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            operation: dict[str, Any] = operations[method.lower()]
            return operation
    raise AssertionError(f"{method} {path} is in no operation of the description")


def undocumented(response: httpx.Response) -> list[str]:
    """What of this answer its operation in the description does not say."""
    request = response.request
    where = f"{request.method} {request.url.path} -> {response.status_code}"
    documented = _operation(request.method, request.url.path)["responses"].get(
        str(response.status_code)
    )
    if documented is None:
        return [f"{where}: status not listed"]
    declared = {name.lower() for name in documented.get("headers", {})}
    return [
        f"{where}: header {name} not declared"
        for name in sorted(CONTRACT_HEADERS & set(response.headers) - declared)
    ]


@pytest.fixture
def answers(ar: Harness) -> Iterator[list[httpx.Response]]:
    """Every answer the node gives during the test; checked at its end."""
    seen: list[httpx.Response] = []
    hooks = ar.http.event_hooks
    ar.http.event_hooks = {**hooks, "response": [*hooks["response"], seen.append]}
    try:
        yield seen
    finally:
        ar.http.event_hooks = hooks


def _checked(seen: list[httpx.Response], *statuses: int) -> None:
    """Every answer documented, and among them those the test set out to get."""
    assert [problem for response in seen for problem in undocumented(response)] == []
    assert set(statuses) <= {response.status_code for response in seen}


def _flip_part(ar: Harness, msg_id: str, index: int) -> Callable[[], None]:
    with unit_of_work(ar.node.sessions) as session:
        part = session.scalar(
            select(Part)
            .join(Message, Message.id == Part.message_id)
            .where(Message.msg_id == msg_id, Part.part_index == index)
        )
        assert part is not None
        part_id, original = part.id, bytes(part.ciphertext)
        part.ciphertext = original[:-1] + bytes([original[-1] ^ 1])

    def restore() -> None:
        with unit_of_work(ar.node.sessions) as session:
            session.execute(update(Part).where(Part.id == part_id).values(ciphertext=original))

    return restore


def test_damaged_storage_answers_500_where_documented(
    ar: Harness, answers: list[httpx.Response]
) -> None:
    request_id = ar.receive_request()
    base = f"/api/v1/requests/{request_id}"
    download = f"{base}/messages/{request_id}/attachments/1"
    proof = f"{base}/messages/{request_id}/proof"
    for path in (base, download, proof):
        assert ar.get(path).status_code == 200
    restore = _flip_part(ar, request_id, 0)  # the manifest: the request and its proof
    try:
        for path in (base, proof):
            refused = ar.get(path)
            assert refused.status_code == 500, refused.text
            assert refused.json()["error"] == "stored_envelope_corrupt"
    finally:
        restore()
    restore = _flip_part(ar, request_id, 1)  # the attachment's bytes
    try:
        assert ar.get(download).status_code == 500
    finally:
        restore()
    _checked(answers, 200, 500)


def test_a_repeated_envelope_whose_receipt_is_damaged_answers_a_documented_500(
    ar: Harness, answers: list[httpx.Response]
) -> None:
    envelope = ar._seal({"kind": "request", "document": example_document()}, None, None)
    assert ar.post_envelope(envelope).status_code == 201
    msg_id = json.loads(envelope.header)["msg_id"]
    with unit_of_work(ar.node.sessions) as session:
        receipt = session.scalar(select(Receipt).join(Message).where(Message.msg_id == msg_id))
        assert receipt is not None
        receipt.signature = bytes(64)
    repeated = ar.post_envelope(envelope)
    assert repeated.status_code == 500, repeated.text
    assert repeated.json()["error"] == "stored_envelope_corrupt"
    _checked(answers, 201, 500)


def test_download_replay_and_challenge_headers_are_declared(
    ar: Harness, answers: list[httpx.Response]
) -> None:
    request_id = ar.receive_request()
    download = ar.get(f"/api/v1/requests/{request_id}/messages/{request_id}/attachments/1")
    assert download.status_code == 200
    assert {"content-disposition", "x-entraide-sha256", "x-entraide-media-type"} <= set(
        download.headers
    )
    declared = _operation("GET", download.request.url.path)["responses"]["200"]
    assert declared["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    once = {**ar.as_("officer"), "idempotency-key": f"ack-{request_id}"}
    path = f"/api/v1/requests/{request_id}/messages"
    first = ar.http.post(path, headers=once, json={"document": ACK})
    again = ar.http.post(path, headers=once, json={"document": ACK})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true"
    refused = ar.http.get("/api/v1/requests", headers={"authorization": "Bearer ent_nope"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    _checked(answers, 200, 201, 401)


def _upload_draft(ar: Harness, data: bytes) -> tuple[str, str]:
    request_id = ar.receive_request()
    body = {
        "document": ACK,
        "attachments": [{"name": "minutes.pdf", "media_type": "application/pdf", "size": 6}],
    }
    created = ar.post(f"/api/v1/requests/{request_id}/messages/drafts", body)
    assert created.status_code == 201, created.text
    draft = created.json()
    assert len(data) == draft["attachments"][0]["size"]
    return str(draft["id"]), str(draft["attachments"][0]["href"])


def test_an_upload_as_the_description_says_it(ar: Harness, answers: list[httpx.Response]) -> None:
    """What a client generated from the description does: bytes as the body, the offset in a
    header, and where to resume read from the answer's headers."""
    data = b"%PDF-1"
    draft_id, href = _upload_draft(ar, data)
    patch = _operation("PATCH", href)
    assert patch["requestBody"]["content"]["application/octet-stream"]["schema"] == {
        "type": "string",
        "format": "binary",
    }
    assert {(p["name"].lower(), p["in"], p["required"]) for p in patch["parameters"]} >= {
        ("upload-offset", "header", True)
    }
    for status in ("204", "409"):
        assert {"Upload-Offset", "Upload-Length", "Upload-Complete"} <= set(
            patch["responses"][status]["headers"]
        )
    octets = {**ar.as_("officer"), "content-type": "application/octet-stream"}
    asked = ar.http.head(href, headers=ar.as_("officer"))
    assert (asked.status_code, asked.headers["upload-offset"]) == (204, "0")
    wrong = ar.http.patch(href, content=data[2:], headers={**octets, "upload-offset": "2"})
    assert wrong.status_code == 409
    resume = int(wrong.headers["upload-offset"])
    sent = ar.http.patch(href, content=data[resume:], headers={**octets, "upload-offset": "0"})
    assert sent.status_code == 204, sent.text
    assert sent.headers["upload-complete"] == "?1"
    assert sent.headers["upload-offset"] == sent.headers["upload-length"] == str(len(data))
    # The draft's key no longer opens: every route that opens it answers the documented 500.
    with unit_of_work(ar.node.sessions) as session:
        draft = session.get(EvidenceDraft, draft_id)
        assert draft is not None
        draft.key_wrap = bytes(len(draft.key_wrap))
    assert ar.get(f"/api/v1/evidence/drafts/{draft_id}").status_code == 500
    head = ar.http.head(href, headers=ar.as_("officer"))
    assert (head.status_code, head.headers["entraide-error"]) == (500, "stored_envelope_corrupt")
    assert ar.post(f"/api/v1/evidence/drafts/{draft_id}/submit", None).status_code == 500
    _checked(answers, 204, 409, 500)


def test_every_body_read_whole_lists_what_reading_it_may_answer() -> None:
    """408 body_timeout, 413 too_large and 503 busy (with Retry-After) come from the node's
    reading of the body (app/limits.py), before any route runs (answered for real in
    tests/e2e/test_stalled_bodies.py)."""
    from app.limits import buffered_body  # here: the module loads on a node without it

    buffered = [
        (method.upper(), path, operation["responses"])
        for path, operations in SPEC["paths"].items()
        for method, operation in operations.items()
        if buffered_body(method.upper(), path)
    ]
    assert len(buffered) >= 15
    for method, path, responses in buffered:
        assert {"408", "413", "503"} <= set(responses), f"{method} {path}"
        assert "Retry-After" in responses["503"]["headers"], f"{method} {path}"


def test_the_streamed_bodies_are_bytes_and_the_peer_part_routes_their_answers() -> None:
    part = SPEC["paths"]["/p2p/v1/evidence/envelopes/{msg_id}/parts/{index}"]
    assert "octet-stream" in str(part["put"]["requestBody"]["content"])
    assert {"201", "204", "409"} <= set(part["put"]["responses"])
    assert "Upload-Offset" in part["put"]["responses"]["204"]["headers"]
    # HEAD answers 204 (with Upload-Offset), never 200.
    assert "204" in part["head"]["responses"]
    assert "200" not in part["head"]["responses"]
    announce = SPEC["paths"]["/p2p/v1/evidence/envelopes"]["post"]["responses"]
    assert {"200", "201", "202"} <= set(announce)


def test_every_operation_said_to_open_stored_data_exists() -> None:
    """OPENS_STORED names operations by path: one renamed must not drop its 500 silently."""
    from app.openapi import OPENS_STORED

    for method, path in OPENS_STORED:
        assert "500" in SPEC["paths"][path][method.lower()]["responses"], f"{method} {path}"
