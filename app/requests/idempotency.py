"""`Idempotency-Key`: a submission sent again after a lost answer is not sent twice.

A case system whose `POST` timed out cannot tell whether the node took it. With a key of its
choosing on the call (the `Idempotency-Key` header, as in the IETF draft of that name), it
sends the same call again with the same key: the node answers what it answered the first
time (with `Idempotent-Replayed: true`) and seals nothing new. The key is the client's own
(two clients may use the same key), taken in the submission's own transaction: a submission
that fails takes no key, and two calls with one key at once are one submission and one
replay (PostgreSQL: the second waits for the first's key, then reads its answer). The same
key with another call (another route or body) is refused, `422 idempotency_key_reused`.
Keys are kept IDEMPOTENCY_DAYS, then pruned by the node's housekeeping.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Header, Response
from pydantic import BaseModel
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import Principal
from app.crypto.encoding import utc_now
from app.db import unit_of_work
from app.errors import EntraideError
from app.models import IdempotencyKey

Model = TypeVar("Model", bound=BaseModel)

IDEMPOTENCY_DAYS = 7
REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_HEADER = "Idempotency-Key"

# Printable ASCII without spaces or quotes: UUIDs, ULIDs, case numbers with separators.
KeyHeader = Annotated[
    str | None,
    Header(alias=IDEMPOTENCY_HEADER, pattern=r"^[A-Za-z0-9._:/+=-]{1,100}$"),
]


class KeyReused(EntraideError):
    status_code = 422
    code = "idempotency_key_reused"


@dataclass(frozen=True)
class Answer:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def fingerprint(route: str, body: BaseModel) -> str:
    """The call a key stands for: its route (with the ids in its path) and its body."""
    canonical = json.dumps(
        [route, body.model_dump(mode="json")], sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _claim(session: Session, client_id: int, key: str, print_: str) -> Answer | None:
    row = session.get(IdempotencyKey, (client_id, key))
    if row is None:
        session.add(
            IdempotencyKey(client_id=client_id, key=key, fingerprint=print_, created_at=utc_now())
        )
        # PostgreSQL: a call holding this key, not yet committed, makes this wait, then fail
        # (IntegrityError): `answer_once` then reads that call's answer.
        session.flush()
        return None
    if not hmac.compare_digest(row.fingerprint, print_):
        raise KeyReused(
            "this Idempotency-Key was used for another call: use a new key for a new submission"
        )
    if row.response is None or row.status_code is None:  # pragma: no cover - same transaction
        raise RuntimeError("an idempotency key without its answer")
    return Answer(row.status_code, json.loads(row.response), replayed=True)


def answer_once(
    sessions: sessionmaker[Session],
    principal: Principal,
    key: str | None,
    print_: str,
    submit: Callable[[Session], tuple[int, BaseModel]],
) -> Answer:
    """Run `submit` in a unit of work, once per key: the key is taken in the same
    transaction, and its answer stored with it. Without a key, `submit` alone."""
    for attempt in range(2):
        try:
            with unit_of_work(sessions) as session:
                if key is not None:
                    stored = _claim(session, principal.client_id, key, print_)
                    if stored is not None:
                        return stored
                status, model = submit(session)
                body = model.model_dump(mode="json")
                if key is not None:
                    row = session.get(IdempotencyKey, (principal.client_id, key))
                    if row is not None:
                        row.status_code, row.response = status, json.dumps(body)
                return Answer(status, body, replayed=False)
        except IntegrityError:
            if key is None or attempt:
                raise
            # Another call with this key committed first: read its answer.
    raise AssertionError("unreachable")  # pragma: no cover


def answered_once(
    sessions: sessionmaker[Session],
    principal: Principal,
    key: str | None,
    route: str,
    body: BaseModel,
    response: Response,
    make: Callable[[Session], Model],
    model: type[Model],
) -> Model:
    """A route's call under the caller's Idempotency-Key: `make` once (a created answer,
    201), its answer again for a repeat, with the replay header."""
    answer = answer_once(
        sessions, principal, key, fingerprint(route, body), lambda session: (201, make(session))
    )
    if answer.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return model.model_validate(answer.body)


def prune(session: Session, now: datetime | None = None) -> int:
    """Forget keys older than IDEMPOTENCY_DAYS."""
    before = (now or utc_now()) - timedelta(days=IDEMPOTENCY_DAYS)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
