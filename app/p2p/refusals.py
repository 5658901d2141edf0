"""Refused peer input: read what it claims cheaply, count it per address, audit it.

Anyone can post to the peer-to-peer API, so a refusal must cost this node little: a body is
parsed off the event loop when it is large, and a refused envelope's claimed sender and
message id are read only from a header within the size bound, before the transaction that
counts and audits it (a write transaction: on SQLite it holds the database's write lock).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.audit.log import record
from app.crypto import envelope as env
from app.crypto.encoding import DecodeError, b64d, load_canonical_object
from app.db import unit_of_work
from app.deps import record_p2p_refusal
from app.errors import EnvelopeRefused
from app.node import Node

# Below this a body parses in well under a millisecond: not worth a thread hop.
INLINE_PARSE_BYTES = 64 * 1024


def parse_json(raw: bytes) -> object | None:
    """The body as JSON, or None if it is not (bad UTF-8, bad JSON, absurd nesting).

    UTF-8 only (RFC 8259 §8.1): `json.loads` of bytes would also take UTF-16 and UTF-32,
    whose bytes the value count before parsing (app/limits.py) does not read as JSON, so a
    body in them went uncounted and built millions of values (from review). A byte order
    mark is refused too."""
    try:
        value: object = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return value


async def json_body(request: Request) -> object | None:
    """The request's JSON body; a large one is parsed in the thread pool, so that a peer's
    30 MiB of nested objects never stalls the event loop for everyone else."""
    raw = await request.body()
    if len(raw) <= INLINE_PARSE_BYTES:
        return parse_json(raw)
    return await run_in_threadpool(parse_json, raw)


@dataclass(frozen=True)
class Claimed:
    """What a refused envelope says about itself: never trusted, only recorded as claimed."""

    sender: str | None = None
    msg_id: str | None = None


def claimed_routing(wire: object, *, max_header_bytes: int) -> Claimed:
    """The claimed sender and message id of a refused envelope, if its header is within the
    size bound and parses; nothing otherwise (parsing a header past the bound would hand
    its sender our CPU)."""
    if not isinstance(wire, dict) or not isinstance(wire.get("header"), str):
        return Claimed()
    encoded: str = wire["header"]
    if len(encoded) > 4 * (max_header_bytes // 3 + 1):  # base64 of max_header_bytes
        return Claimed()
    try:
        raw = b64d(encoded)
        # The header's own part count: an announcement (app/evidence) carries part 0 only.
        declared = load_canonical_object(raw).get("parts")
        header = env.parse_header(raw, len(declared) if isinstance(declared, list) else 0)
    except (env.EnvelopeError, DecodeError, TypeError):
        return Claimed()
    return Claimed(header.from_authority[:40], header.msg_id)


def audit_refusals(
    node: Node, refusals: Sequence[tuple[object, EnvelopeRefused]], *, source: str
) -> None:
    """Count each refusal against the sending address and audit it, with what the envelope
    claims, until the address is throttled (then refusals are only counted)."""
    max_header_bytes = node.settings.max_header_bytes
    claims = [claimed_routing(wire, max_header_bytes=max_header_bytes) for wire, _ in refusals]
    with unit_of_work(node.sessions) as session:
        for claimed, (_, refusal) in zip(claims, refusals, strict=True):
            if not record_p2p_refusal(session, node, source):
                continue
            record(
                session,
                actor=f"peer:{claimed.sender}" if claimed.sender else "peer:unknown",
                action="envelope.refused",
                outcome=refusal.code,
                msg_id=claimed.msg_id,
                peer=claimed.sender,
                details={"code": refusal.code, "detail": refusal.detail, "claimed": True},
            )
