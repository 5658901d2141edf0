"""Byte encodings shared by every protocol object.

Protocol objects are UTF-8 JSON with sorted keys and no insignificant white space; binary
values are standard base64 with padding (RFC 4648 section 4) and hashes are lower-case hex.
Signatures always cover the exact bytes received, never a re-serialisation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any


class DecodeError(ValueError):
    """Bytes that are not what the protocol says they must be."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DecodeError("duplicate key in a JSON object")
    return result


def _no_constants(name: str) -> Any:
    raise DecodeError(f"{name} is not allowed in protocol JSON")


def load_canonical_object(data: bytes) -> dict[str, Any]:
    """Parse a signed protocol object and insist it is in canonical form.

    Signatures cover bytes; requiring those bytes to be exactly the canonical serialisation
    of what they parse to means every parser reads the same values from them (no duplicate
    keys, no NaN, no alternative spellings), whatever its language.
    """
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
    except DecodeError:
        raise  # the hooks' own words
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError(f"not JSON ({exc.msg} at character {exc.pos})") from exc
    except RecursionError as exc:
        raise DecodeError("not JSON this side reads: nested too deeply") from exc
    except ValueError as exc:  # the interpreter's own limits (a number of 4,300 digits)
        raise DecodeError("not JSON this side reads: a number too long") from exc
    if not isinstance(value, dict):
        raise DecodeError("not a JSON object")
    try:
        canonical = canonical_json(value)
    except (ValueError, RecursionError) as exc:  # nesting json.loads took, json.dumps not
        raise DecodeError("not representable canonically") from exc
    if canonical != data:
        raise DecodeError("not in canonical form (sorted keys, no spaces, UTF-8)")
    return value


def is_int(value: object) -> bool:
    """A JSON integer: not a boolean, not a float."""
    return type(value) is int


def load_json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert.
        raise DecodeError("not UTF-8 JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError("not a JSON object")
    return value


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, *, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("expected a base64 string")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise DecodeError("invalid base64") from exc
    if length is not None and len(data) != length:
        raise DecodeError(f"expected {length} bytes, got {len(data)}")
    return data


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_id(public_key: bytes) -> str:
    """First 16 bytes of SHA-256 of the raw public key, lower-case hex."""
    return sha256(public_key)[:16].hex()


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with second precision and a literal Z: one spelling per instant, the one
    `parse_time` reads (strftime's %Y does not pad a year before 1000 on glibc: year 1 was
    written `1-01-01T...`, in refusals that quote a peer's time)."""
    return moment.astimezone(UTC).isoformat(timespec="seconds")[:19] + "Z"


TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def parse_time(text: object) -> datetime:
    # strptime alone accepts unpadded fields and non-ASCII digits: one instant, many spellings.
    if not isinstance(text, str) or not TIMESTAMP.fullmatch(text):
        raise DecodeError("timestamp is not YYYY-MM-DDTHH:MM:SSZ")
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise DecodeError("timestamp is not YYYY-MM-DDTHH:MM:SSZ") from exc
    return moment.replace(tzinfo=UTC)
