"""Authenticated tokens are trusted again for a moment (app/auth/cache.py), never longer.

Revocation happens in another process (`entraide clients revoke`): the node must refuse the
revoked token within `TOKEN_CACHE_SECONDS`, and never use a token past its own expiry.
"""

from __future__ import annotations

import time
from datetime import timedelta

from app.auth.cache import TOKEN_CACHE_SECONDS, TokenCache
from app.auth.service import Principal, Role, create_client, revoke_client
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from tests.requests.conftest import Harness

LIST = "/api/v1/requests"


def _refused_after(harness: Harness, token: str, revoked_at: float) -> tuple[float, str]:
    """Call until refused: when the last accepted call started, after `revoked_at`, and the
    refusal's code.

    Start times, not answer times: the cache promises that a call *arriving*
    `TOKEN_CACHE_SECONDS` after the revocation is checked again, and a slow answer (a loaded
    host, a database round trip) says nothing about when the node decided.
    """
    last_accepted = 0.0
    while True:
        started = time.monotonic() - revoked_at
        response = harness.http.get(LIST, headers={"authorization": f"Bearer {token}"})
        if response.status_code != 200:
            assert response.status_code in (401, 429), response.text
            return last_accepted, str(response.json()["error"])
        assert started < TOKEN_CACHE_SECONDS, f"a call made {started:.2f} s later was accepted"
        last_accepted = started
        time.sleep(0.05)


def test_a_revoked_client_is_refused_within_the_cache_time(fresh_ar: Harness) -> None:
    with unit_of_work(fresh_ar.node.sessions) as session:
        _, token = create_client(session, name="soon-revoked", roles={Role.OFFICER})
    headers = {"authorization": f"Bearer {token}"}
    for _ in range(3):  # trusted, and now cached
        assert fresh_ar.http.get(LIST, headers=headers).status_code == 200
    # As `entraide clients revoke` does, from its own process: nothing tells this node.
    with unit_of_work(fresh_ar.node.sessions) as session:
        revoke_client(session, name="soon-revoked")
    last_accepted, code = _refused_after(fresh_ar, token, time.monotonic())
    assert code == "revoked_token"
    assert last_accepted < TOKEN_CACHE_SECONDS
    for _ in range(3):  # and for good
        response = fresh_ar.http.get(LIST, headers=headers)
        assert (response.status_code, response.json()["error"]) == (401, "revoked_token")


def test_a_cached_token_is_never_used_past_its_expiry(fresh_ar: Harness) -> None:
    expires_at = utc_now() + timedelta(seconds=2)  # time for the first call on a busy host
    with unit_of_work(fresh_ar.node.sessions) as session:
        _, token = create_client(
            session, name="short-lived", roles={Role.OFFICER}, expires_at=expires_at
        )
    headers = {"authorization": f"Bearer {token}"}
    assert fresh_ar.http.get(LIST, headers=headers).status_code == 200
    time.sleep(max(0.0, (expires_at - utc_now()).total_seconds()) + 0.05)
    # Well inside TOKEN_CACHE_SECONDS of the cached success, but past the token's expiry.
    response = fresh_ar.http.get(LIST, headers=headers)
    assert (response.status_code, response.json()["error"]) == (401, "expired_token")


def test_an_address_blocked_here_is_refused_even_with_a_cached_token(fresh_ar: Harness) -> None:
    good = fresh_ar.as_("officer")
    assert fresh_ar.http.get(LIST, headers=good).status_code == 200  # cached
    limit = fresh_ar.node.settings.auth_failure_limit
    bad = {"authorization": "Bearer ent_not-a-token"}
    answers = [fresh_ar.http.get(LIST, headers=bad).status_code for _ in range(limit + 1)]
    assert answers[-1] == 429
    response = fresh_ar.http.get(LIST, headers=good)
    assert (response.status_code, response.json()["error"]) == (429, "rate_limited")


def test_the_cache_is_per_address_bounded_and_cleared() -> None:
    now = utc_now()
    principal = Principal(1, "officer", frozenset({Role.OFFICER}))
    cache = TokenCache(seconds=1.0, max_entries=2)
    cache.put("digest", "10.0.0.1", principal, now, expires_at=None)
    assert cache.get("digest", "10.0.0.1", now) == principal
    assert cache.get("digest", "10.0.0.2", now) is None  # another address checks again
    assert cache.get("digest", "10.0.0.1", now + timedelta(seconds=1)) is None  # stale
    cache.put("a", "x", principal, now, expires_at=now)  # expired already: not kept
    assert cache.get("a", "x", now) is None
    for name in ("a", "b", "c"):
        cache.put(name, "x", principal, now, expires_at=None)
    assert cache.get("c", "x", now) == principal
    cache.clear()
    assert cache.get("c", "x", now) is None
