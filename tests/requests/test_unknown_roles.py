"""A role this release does not know, in a client's stored list (a later release's, left by a
database shared during an upgrade or a release rolled back), grants nothing and breaks
nothing: from review, when `monitor` came, an earlier release answered 500 to every call
made with a token holding it."""

from __future__ import annotations

from sqlalchemy import update

from app.auth.service import Role, create_client
from app.db import unit_of_work
from app.models import ApiClient
from tests.requests.conftest import Harness


def _client_with_stored_roles(ar: Harness, name: str, stored: str) -> str:
    with unit_of_work(ar.node.sessions) as session:
        client, token = create_client(session, name=name, roles={Role.AUDITOR})
        session.flush()
        session.execute(update(ApiClient).where(ApiClient.id == client.id).values(roles=stored))
    return token


def test_a_role_from_a_later_release_grants_nothing_and_the_others_still_work(
    ar: Harness,
) -> None:
    mixed = _client_with_stored_roles(
        ar, f"mixed-{ar.node.settings.database_url[-6:]}", "auditor,warden"
    )
    only = _client_with_stored_roles(ar, "later", "warden")

    reads = ar.http.get("/api/v1/audit", headers={"authorization": f"Bearer {mixed}"})
    assert reads.status_code == 200, reads.text  # its known role, as before

    for token in (mixed, only):
        refused = ar.http.get("/api/v1/requests", headers={"authorization": f"Bearer {token}"})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "forbidden"
    nothing = ar.http.get("/api/v1/audit", headers={"authorization": f"Bearer {only}"})
    assert nothing.status_code == 403, nothing.text
