"""API clients: 256-bit random tokens, shown once, stored only as their SHA-256.

A token has 256 bits of entropy, so a fast hash is enough: there is nothing to brute-force,
and lookups by hash stay constant-time with respect to the secret.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.crypto.encoding import sha256_hex, utc_now
from app.errors import BadRequest, Conflict, NotFound, Unauthenticated
from app.models import ApiClient

TOKEN_PREFIX = "ent_"  # noqa: S105  # a recognisable prefix, not a secret


class Role(StrEnum):
    OFFICER = "officer"
    AUDITOR = "auditor"
    ADMIN = "admin"
    # A Prometheus scraper's: /metrics and nothing else (an admin may read them too).
    MONITOR = "monitor"


@dataclass(frozen=True)
class Principal:
    client_id: int
    name: str
    roles: frozenset[Role]
    expires_at: datetime | None = None  # the token's, when it has one


def hash_token(token: str) -> str:
    return sha256_hex(token.encode())


# Letters and digits of ASCII, then . _ @ + -: a name is read in `clients list`, in audit
# entries and in a request's list of officers, where a control character, a bidi override
# or a lookalike (`ofﬁcer`, with the ligature ﬁ) misled whoever read it (from review).
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}$"


def check_client_name(name: str) -> None:
    if re.fullmatch(CLIENT_NAME_PATTERN, name) is None:
        raise BadRequest(
            "a client's name is 1 to 100 ASCII letters, digits and . _ @ + -, starting with a "
            "letter or a digit",
            code="invalid_client_name",
        )


def create_client(
    session: Session, *, name: str, roles: set[Role], expires_at: datetime | None = None
) -> tuple[ApiClient, str]:
    check_client_name(name)
    if session.scalar(select(ApiClient).where(ApiClient.name == name)) is not None:
        raise Conflict(f"an API client named {name!r} exists already", code="client_exists")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    client = ApiClient(
        name=name,
        token_hash=hash_token(token),
        roles=",".join(sorted(role.value for role in roles)),
        created_at=utc_now(),
        expires_at=expires_at,
    )
    session.add(client)
    session.flush()
    return client, token


def revoke_client(session: Session, *, name: str) -> ApiClient:
    client = session.scalar(select(ApiClient).where(ApiClient.name == name))
    if client is None:
        raise NotFound(f"no API client named {name!r}", code="unknown_client")
    if client.revoked_at is None:
        client.revoked_at = utc_now()
        # Written now, before the caller's audit entry (written through a cursor of its own,
        # which does not flush the session): the client's row, then the log's head, as a
        # draft's creation takes them; in the other order the two deadlocked (PostgreSQL).
        session.flush()
    return client


def list_clients(session: Session) -> list[ApiClient]:
    return list(session.scalars(select(ApiClient).order_by(ApiClient.name)))


class TokenRefused(Unauthenticated):
    """A bearer token that does not authenticate; `client_id` when it names a known client."""

    def __init__(self, detail: str, *, code: str, client_id: int | None = None) -> None:
        super().__init__(detail, code=code)
        self.client_id = client_id


def authenticate(session: Session, token: str) -> Principal:
    digest = hash_token(token)
    client = session.scalar(select(ApiClient).where(ApiClient.token_hash == digest))
    if client is None or not hmac.compare_digest(client.token_hash, digest):
        raise TokenRefused("unknown token", code="invalid_token")
    if client.revoked_at is not None:
        raise TokenRefused("token revoked", code="revoked_token", client_id=client.id)
    if client.expires_at is not None and client.expires_at <= utc_now():
        raise TokenRefused("token expired", code="expired_token", client_id=client.id)
    return Principal(
        client_id=client.id,
        name=client.name,
        roles=known_roles(client.roles),
        expires_at=client.expires_at,
    )


def withdrawn(session: Session, client_id: int) -> TokenRefused | None:
    """Why a client authenticated earlier may no longer act: its token revoked or expired
    since (a call that lasts, app/auth/lasting.py); None while it may."""
    row = session.execute(
        select(ApiClient.revoked_at, ApiClient.expires_at).where(ApiClient.id == client_id)
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return TokenRefused("token revoked", code="revoked_token", client_id=client_id)
    if row.expires_at is not None and row.expires_at <= utc_now():
        return TokenRefused("token expired", code="expired_token", client_id=client_id)
    return None


def known_roles(stored: str) -> frozenset[Role]:
    """The roles of a client's stored list that this release knows. One a later release
    added (a database shared during an upgrade, or a release rolled back) grants nothing
    here: an earlier release raised on it and answered 500 to every call with that token
    (from review, when `monitor` came)."""
    return frozenset(Role(role) for role in stored.split(",") if role in _ROLE_NAMES)


_ROLE_NAMES = frozenset(role.value for role in Role)
