"""The signed request a restored node sends a peer for what they exchanged after a time.

Only the node itself may ask for its exchange: the request is signed with its signing key
under a domain of its own, names both authorities, and is fresh (within the clock skew the
envelopes allow), so a copy replayed later, or sent to another node, is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nacl.signing import SigningKey

from app.config import AUTHORITY_ID_PATTERN
from app.crypto.encoding import (
    DecodeError,
    b64d,
    b64e,
    canonical_json,
    format_time,
    is_int,
    load_canonical_object,
    parse_time,
)
from app.crypto.signing import DOMAIN_RECOVERY, sign, verify
from app.errors import EntraideError

VERSION = 1
REQUEST_TYPE = "entraide.recovery-request"
FIELDS = {"v", "type", "from", "to", "sig_kid", "since", "after", "created_at"}
PART_REQUEST_TYPE = "entraide.recovery-part-request"
PART_FIELDS = {"v", "type", "from", "to", "sig_kid", "msg_id", "index", "offset", "created_at"}
MSG_ID = re.compile(r"[0-9a-f]{32}")
MAX_REQUEST_BYTES = 2048
AUTHORITY = re.compile(AUTHORITY_ID_PATTERN)
KID = re.compile(r"[0-9a-f]{32}")
# A page's cursor: the time the exchange is ordered by, and the message id after it.
CURSOR = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z/[0-9a-f]{32}")


class RecoveryRefused(EntraideError):
    """A recovery request that is malformed, unsigned by its sender, stale or misaddressed."""

    def __init__(self, code: str, detail: str, status_code: int = 400) -> None:
        super().__init__(detail, code=code)
        self.status_code = status_code


@dataclass(frozen=True)
class RecoveryRequest:
    from_authority: str
    to_authority: str
    sig_kid: str
    since: datetime
    after: str | None
    created_at: datetime


def sign_request(
    signing_key: SigningKey,
    *,
    sig_kid: str,
    from_authority: str,
    to_authority: str,
    since: datetime,
    after: str | None,
    created_at: datetime,
) -> dict[str, str]:
    body = canonical_json(
        {
            "v": VERSION,
            "type": REQUEST_TYPE,
            "from": from_authority,
            "to": to_authority,
            "sig_kid": sig_kid,
            "since": format_time(since),
            "after": after,
            "created_at": format_time(created_at),
        }
    )
    return {"request": b64e(body), "signature": b64e(sign(signing_key, DOMAIN_RECOVERY, body))}


def _parse(wire: object, kind: str, members: set[str]) -> tuple[dict[str, Any], bytes, bytes]:
    """The members common to both requests checked (shape only); the rest are the caller's."""
    if not isinstance(wire, dict) or set(wire) != {"request", "signature"}:
        raise RecoveryRefused(
            "malformed_recovery_request", "expected exactly 'request' and 'signature'"
        )
    body = b64d(wire["request"])
    signature = b64d(wire["signature"], length=64)
    if len(body) > MAX_REQUEST_BYTES:
        raise RecoveryRefused("malformed_recovery_request", "the request is too large")
    fields: dict[str, Any] = load_canonical_object(body)
    if set(fields) != members or not is_int(fields["v"]) or fields["v"] != VERSION:
        raise RecoveryRefused("malformed_recovery_request", f"not a version 1 {kind}")
    texts = ("type", "from", "to", "sig_kid")
    if fields["type"] != kind or not all(isinstance(fields[k], str) for k in texts):
        raise RecoveryRefused("malformed_recovery_request", f"not a version 1 {kind}")
    if not (AUTHORITY.fullmatch(fields["from"]) and AUTHORITY.fullmatch(fields["to"])):
        raise RecoveryRefused("malformed_recovery_request", "an authority id is malformed")
    if not KID.fullmatch(fields["sig_kid"]):
        raise RecoveryRefused("malformed_recovery_request", "the key id is malformed")
    return fields, body, signature


def parse_request(wire: object) -> tuple[RecoveryRequest, bytes, bytes]:
    """Shape only: the request, its exact bytes and its signature, nothing verified yet."""
    try:
        fields, body, signature = _parse(wire, REQUEST_TYPE, FIELDS)
        after = fields["after"]
        if after is not None and not (isinstance(after, str) and CURSOR.fullmatch(after)):
            raise RecoveryRefused("malformed_recovery_request", "the cursor is malformed")
        if after is not None:
            split_cursor(after)  # a time that is no time (month 13) is refused here
        request = RecoveryRequest(
            from_authority=fields["from"],
            to_authority=fields["to"],
            sig_kid=fields["sig_kid"],
            since=parse_time(fields["since"]),
            after=after,
            created_at=parse_time(fields["created_at"]),
        )
    except DecodeError as exc:
        raise RecoveryRefused("malformed_recovery_request", f"malformed request: {exc}") from exc
    return request, body, signature


@dataclass(frozen=True)
class PartRequest:
    """For one streamed part of a listed message, from `offset` (docs/protocol.md §8.7)."""

    from_authority: str
    to_authority: str
    sig_kid: str
    msg_id: str
    index: int
    offset: int
    created_at: datetime


def sign_part_request(
    signing_key: SigningKey,
    *,
    sig_kid: str,
    from_authority: str,
    to_authority: str,
    msg_id: str,
    index: int,
    offset: int,
    created_at: datetime,
) -> dict[str, str]:
    body = canonical_json(
        {
            "v": VERSION,
            "type": PART_REQUEST_TYPE,
            "from": from_authority,
            "to": to_authority,
            "sig_kid": sig_kid,
            "msg_id": msg_id,
            "index": index,
            "offset": offset,
            "created_at": format_time(created_at),
        }
    )
    return {"request": b64e(body), "signature": b64e(sign(signing_key, DOMAIN_RECOVERY, body))}


def parse_part_request(wire: object) -> tuple[PartRequest, bytes, bytes]:
    """Shape only, as `parse_request`."""
    try:
        fields, body, signature = _parse(wire, PART_REQUEST_TYPE, PART_FIELDS)
        msg_id, index, offset = fields["msg_id"], fields["index"], fields["offset"]
        if not (isinstance(msg_id, str) and MSG_ID.fullmatch(msg_id)):
            raise RecoveryRefused("malformed_recovery_request", "the message id is malformed")
        if not (is_int(index) and 1 <= index < 2**16 and is_int(offset) and 0 <= offset < 2**62):
            raise RecoveryRefused("malformed_recovery_request", "the part or offset is malformed")
        request = PartRequest(
            from_authority=fields["from"],
            to_authority=fields["to"],
            sig_kid=fields["sig_kid"],
            msg_id=msg_id,
            index=index,
            offset=offset,
            created_at=parse_time(fields["created_at"]),
        )
    except DecodeError as exc:
        raise RecoveryRefused("malformed_recovery_request", f"malformed request: {exc}") from exc
    return request, body, signature


def check_request(
    request: RecoveryRequest | PartRequest,
    body: bytes,
    signature: bytes,
    *,
    signer_public: bytes,
    own_authority: str,
    now: datetime,
    skew: timedelta,
) -> None:
    """Signed by the sender's pinned key, addressed to this node, made within `skew` of now."""
    if not verify(signer_public, DOMAIN_RECOVERY, body, signature):
        raise RecoveryRefused("bad_signature", "the request's signature does not verify", 403)
    if request.to_authority != own_authority:
        raise RecoveryRefused(
            "not_addressed_to_us", "the request is addressed to another authority", 421
        )
    if abs(request.created_at - now) > skew:
        raise RecoveryRefused(
            "stale_request",
            f"the request was made at {format_time(request.created_at)}, more than "
            f"{int(skew.total_seconds())} s from this node's clock ({format_time(now)})",
        )


def cursor_of(at: datetime, msg_id: str) -> str:
    return f"{format_time(at)}/{msg_id}"


def split_cursor(cursor: str) -> tuple[datetime, str]:
    at, _, msg_id = cursor.partition("/")
    return parse_time(at), msg_id
