"""Domain errors, each carrying its HTTP status and a stable machine-readable code.

    EntraideError
    ├── BadRequest (400)            malformed input the schema could not catch
    ├── Unauthenticated (401)       missing, unknown, expired or revoked token
    ├── Forbidden (403)             authenticated but not allowed
    ├── NotFound (404)
    ├── Conflict (409)
    ├── PayloadTooLarge (413)
    ├── PeerError (502)             a peer answered badly or not at all
    ├── EnvelopeRefused (4xx)       a P2P envelope failed one of the receiver's checks;
    │                               `code` names the check (see docs/protocol.md)
    ├── StoredEnvelopeCorrupt (500) what this node stored no longer checks out: never input
    └── StoredDataCorrupt (500)     a stored value the database cannot give back: never input

Services raise these; one handler in `app.main` turns them into
`{"error": code, "detail": detail}`. Messages never contain secrets or request content.
"""

from __future__ import annotations

from typing import Any

# An answer to HEAD has no body: a refusal's code travels in this header instead.
ERROR_HEADER = "entraide-error"


class EntraideError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequest(EntraideError):
    status_code = 400
    code = "bad_request"


class Unauthenticated(EntraideError):
    status_code = 401
    code = "unauthenticated"


class Forbidden(EntraideError):
    status_code = 403
    code = "forbidden"


class NotFound(EntraideError):
    status_code = 404
    code = "not_found"


class Conflict(EntraideError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(EntraideError):
    status_code = 413
    code = "too_large"


class UnsupportedMediaType(EntraideError):
    status_code = 415
    code = "unsupported_media_type"


class PeerError(EntraideError):
    status_code = 502
    code = "peer_error"


class EnvelopeRefused(EntraideError):
    """A received envelope failed a check; nothing of it was stored."""

    status_code = 400

    def __init__(self, code: str, detail: str, *, status_code: int = 400) -> None:
        super().__init__(detail, code=code)
        self.status_code = status_code


class StoredEnvelopeCorrupt(EntraideError):
    """A stored envelope (or its receipt) no longer opens or verifies: storage was altered
    or damaged. Never input.

    `audit`: the entry recording the read it stopped (outcome `stored_envelope_corrupt`),
    written by the error handler once the route's transaction has rolled back."""

    status_code = 500
    code = "stored_envelope_corrupt"
    audit: dict[str, Any] | None = None


class StoredDataCorrupt(EntraideError):
    """A stored value the database cannot give back as its column's type (SQLite: text that
    is not UTF-8, a time that is no time; PostgreSQL: a time its driver cannot load, such
    as 'infinity'): damage to a row, not a database out of reach (that is 503
    `database_unavailable`), nor the caller's input (400 `invalid_value`).

    `audit`: as for StoredEnvelopeCorrupt, when the read it stopped is audited."""

    status_code = 500
    code = "stored_data_corrupt"
    audit: dict[str, Any] | None = None

    @classmethod
    def of_column(
        cls, column: str | None, why: str = "text that is not UTF-8"
    ) -> StoredDataCorrupt:
        where = f"a value stored in column '{column}'" if column is not None else "a stored value"
        return cls(
            f"{where} cannot be read ({why}): storage was altered or damaged; tell the operator"
        )
