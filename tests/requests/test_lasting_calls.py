"""A token revoked while its call lasts: an upload or a download of evidence may go on for
hours, and went on to its end after the token was revoked (because it leaked, say): a
download kept handing the evidence over (from review). The token is read again while the
call lasts (app/auth/lasting.py); once revoked, the call stops, on record."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError

from app.auth import lasting
from app.auth.service import Role, create_client
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.evidence.drafts import upload_id
from app.evidence.node_store import blob_store
from app.evidence.stream import CHUNK_BYTES, CIPHER_CHUNK
from app.models import ApiClient
from tests.requests.conftest import EXAMPLE, Harness


def _officer(ar: Harness) -> tuple[str, dict[str, str]]:
    name = f"leaked-{uuid.uuid4().hex[:8]}"
    with unit_of_work(ar.node.sessions) as session:
        _, token = create_client(session, name=name, roles={Role.OFFICER})
    return name, {"authorization": f"Bearer {token}"}


def _revoke(ar: Harness, name: str) -> None:
    """As `clients revoke` writes it, but leaving the node's token cache as it is: the call
    below is let in by the token checked a moment ago, as one under way was."""
    with unit_of_work(ar.node.sessions) as session:
        session.execute(
            update(ApiClient).where(ApiClient.name == name).values(revoked_at=utc_now())
        )


def _draft(ar: Harness, headers: dict[str, str], size: int) -> tuple[str, str]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = [
        {"name": "e.bin", "media_type": "application/octet-stream", "size": size}
    ]
    created = ar.http.post("/api/v1/evidence/drafts", json=body, headers=headers)
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["attachments"][0]["href"]


def _sent(ar: Harness, headers: dict[str, str], data: bytes) -> tuple[str, str]:
    """A request sent with `data` as its streamed attachment: its id, the attachment's href."""
    draft_id, href = _draft(ar, headers, len(data))
    uploaded = ar.http.patch(href, content=data, headers={**headers, "upload-offset": "0"})
    assert uploaded.status_code == 204, uploaded.text
    submitted = ar.http.post(f"/api/v1/evidence/drafts/{draft_id}/submit", headers=headers)
    assert submitted.status_code == 201, submitted.text
    view = ar.http.get(f"/api/v1/requests/{draft_id}", headers=headers).json()
    return draft_id, str(view["messages"][0]["attachments"][0]["href"])


def _read(ar: Harness, url: str, headers: dict[str, str], received: list[bytes]) -> None:
    with ar.http.stream("GET", url, headers=headers) as streamed:
        assert streamed.status_code == 200  # let in by the token trusted a moment ago
        received.extend(streamed.iter_bytes())


def test_a_download_stops_once_its_token_is_revoked(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, headers = _officer(ar)
    data = b"\1" * (2 * CHUNK_BYTES + 5)
    draft_id, attachment = _sent(ar, headers, data)
    whole = ar.http.get(attachment, headers=headers)  # while the token is valid: all of it
    assert whole.status_code == 200
    assert whole.content == data
    monkeypatch.setattr(lasting, "RECHECK_SECONDS", 0.0)  # read before every chunk
    assert ar.http.get(f"/api/v1/requests/{draft_id}", headers=headers).status_code == 200
    _revoke(ar, name)
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):  # a broken transfer, never a short file
        _read(ar, attachment, headers, received)
    assert len(b"".join(received)) < len(data)
    downloads = ar.audit("attachment.downloaded")
    assert downloads[-1] == (f"client:{name}", "revoked_token", draft_id)


def test_an_upload_stops_once_its_token_is_revoked(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lasting, "RECHECK_SECONDS", 0.0)  # read at every batch
    name, headers = _officer(ar)
    draft_id, href = _draft(ar, headers, 2 * CHUNK_BYTES)
    refused_before = len(ar.audit("auth.failed"))
    assert ar.http.get(f"/api/v1/evidence/drafts/{draft_id}", headers=headers).status_code == 200
    _revoke(ar, name)  # within the second its token stays trusted: the PATCH is let in
    stopped = ar.http.patch(
        href, content=b"\0" * CHUNK_BYTES, headers={**headers, "upload-offset": "0"}
    )
    assert stopped.status_code == 401, stopped.text
    assert stopped.json()["error"] == "revoked_token"
    assert stopped.headers["www-authenticate"] == 'Bearer realm="entraide"'  # as any 401
    assert [outcome for _, outcome, _ in ar.audit("auth.failed")[refused_before:]] == [
        "revoked_token"
    ]
    staging = blob_store(ar.node.settings).uploads / upload_id(draft_id, 1)
    assert staging.stat().st_size in (0, CIPHER_CHUNK)  # nothing past what it checked


def test_a_failed_read_of_the_token_stops_no_download(
    ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of hours reads the token thousands of times: one read failing (a database
    failing over) cut a download that cannot be resumed (from review). It goes on."""
    _, headers = _officer(ar)
    data = b"\2" * (2 * CHUNK_BYTES + 5)
    _, attachment = _sent(ar, headers, data)
    monkeypatch.setattr(lasting, "RECHECK_SECONDS", 0.0)
    engine = ar.node.engine
    failed: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _failing_over(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # The re-check's read alone (by the client's id), as a database failing over.
        if "api_clients.revoked_at" in statement and "WHERE api_clients.id" in statement:
            failed.append(statement)
            raise OperationalError(statement, {}, Exception("the server closed the connection"))

    try:
        received: list[bytes] = []
        _read(ar, attachment, headers, received)
    finally:
        event.remove(engine, "before_cursor_execute", _failing_over)
    assert b"".join(received) == data
    # Not read again at every chunk once a read failed (each may wait for its timeout).
    assert len(failed) == 1
