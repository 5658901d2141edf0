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
from datetime import UTC, datetime
from typing import Any


class DecodeError(ValueError):
    """Bytes that are not what the protocol says they must be."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with second precision and a literal Z: one spelling per instant."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object) -> datetime:
    if not isinstance(text, str):
        raise DecodeError("expected a timestamp string")
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise DecodeError("timestamp is not YYYY-MM-DDTHH:MM:SSZ") from exc
    return moment.replace(tzinfo=UTC)
