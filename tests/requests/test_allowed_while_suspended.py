"""`allowed_messages` while exchanges with the peer are suspended (from review): it still
offered an acknowledgement, a closure ... each of which was then refused with
`409 peer_suspended`; a case system's screen showed buttons that could not work."""

from __future__ import annotations

from tests.requests.conftest import Harness


def _allowed(ar: Harness, request_id: str) -> list[str]:
    response = ar.get(f"/api/v1/requests/{request_id}")
    assert response.status_code == 200, response.text
    allowed: list[str] = response.json()["allowed_messages"]
    return allowed


def test_nothing_is_offered_while_the_peer_is_suspended(ar: Harness) -> None:
    request_id = ar.receive_request()
    offered = _allowed(ar, request_id)
    assert "acknowledgement" in offered
    suspended = ar.post(
        "/api/v1/admin/peers/suspend", {"authority_id": "ES/MJ", "reason": "review"}, "admin"
    )
    assert suspended.status_code == 200, suspended.text
    try:
        assert _allowed(ar, request_id) == []
        refused = ar.reply(request_id, {"type": "acknowledgement", "text": "Registered."})
        assert (refused.status_code, refused.json()["error"]) == (409, "peer_suspended")
    finally:
        resumed = ar.post("/api/v1/admin/peers/resume", {"authority_id": "ES/MJ"}, "admin")
        assert resumed.status_code == 200, resumed.text
    assert _allowed(ar, request_id) == offered
