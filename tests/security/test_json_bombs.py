"""A body within the size limit whose JSON would hold millions of values (32 MiB of
`[{},{},...]` is 11 million dicts, about 770 MiB once parsed) is refused before it is parsed,
on the peer API and on the local API alike (FastAPI parses a body before it checks the
token): 413 `too_large`, the node's memory barely moves, and it goes on serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.jsonvalues import MAX_JSON_VALUES, json_values_exceed
from app.localnodes import LocalNode
from tests.security.conftest import new_node, prepare

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "limit", "exceeds"),
    [
        (b"[1,2,3]", 2, True),  # [ , ,
        (b"[1,2,3]", 3, False),
        (b' \n{"a": [1, {"b": 2}]}', 6, False),  # { : [ , { :
        (b' \n{"a": [1, {"b": 2}]}', 5, True),
        (b'{"text": "commas, colons: [brackets] {braces}, inside a string"}', 2, False),
        (b'["an \\" escaped quote, then commas, ,,,", 1]', 2, False),
        (b'["a \\\\", ",", ","]', 3, False),  # an escaped backslash ends its string
        (b'"a top-level string, with commas, ,,,"', 0, False),
        (b"12345", 0, False),
        (b"not json, at all, ,,,", 0, False),  # the parser refuses it cheaply
    ],
)
def test_values_are_counted_outside_strings(raw: bytes, limit: int, exceeds: bool) -> None:
    assert json_values_exceed(raw, limit) is exceeds


@pytest.mark.parametrize(
    "raw",
    [
        b'["' + b'\\"' * 6000 + b"," * 300_001,  # a string of escaped quotes never closed
        b'["' + b'\\"' * 6000 + b"," * 300_001 + b"\\",  # ... ending in a lone backslash
        b'{"a":"' + b"\\\n" * 6000 + b"," * 300_001,  # escaped newlines
    ],
    ids=["open", "open-backslash", "newlines"],
)
def test_a_string_left_open_is_scanned_once(raw: bytes) -> None:
    """Each of these kept the scan (and with it the whole node, whose interpreter the regular
    expression holds) busy for about 50 s: a string that failed to match was tried again from
    every later quote, to the end each time. Now one pass: far under a second on any machine
    this runs on (the bound is a guard against the quadratic scan, not a speed target)."""
    started = time.perf_counter()
    json_values_exceed(raw)
    assert time.perf_counter() - started < 5.0


def test_the_largest_documents_are_far_below_the_limit() -> None:
    # A list at every maximum the domain schemas allow is about 100,000 values; this is a
    # generous stand-in: 200 persons of 20 identifiers, 100 data items of 100 identifiers.
    person = {"name": "x", "identifiers": [{"type": "passport", "value": "X1"}] * 20}
    item = {"identifiers": [{"type": "email", "value": "a@b.example"}] * 100}
    document = {"persons": [person] * 200, "electronic_data": [item] * 100}
    assert not json_values_exceed(json.dumps(document).encode())


def _bomb(size: int) -> bytes:
    count = (size - 2) // 3
    return b"[" + b"{}," * (count - 1) + b"{}]"


def _peak_rss_mib(node: LocalNode) -> float:
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    local = new_node(tmp_path_factory.mktemp("bombs"))
    try:
        prepare([local])
        yield local
    finally:
        local.stop()


@pytest.mark.parametrize(
    "path", ["/p2p/v1/envelopes", "/p2p/v1/envelopes/batch", "/api/v1/requests"]
)
def test_a_body_of_millions_of_values_is_refused_unparsed(node: LocalNode, path: str) -> None:
    body = _bomb(30 * MIB)
    assert json_values_exceed(body)
    before = _peak_rss_mib(node)
    # A bearer token (any: the check comes before it is looked at) on the local API, where
    # a body without one is refused before it is read.
    headers = {"content-type": "application/json", "authorization": "Bearer ent_not-a-token"}
    response = httpx.post(node.url + path, content=body, headers=headers, timeout=60)
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": "too_large",
        "detail": f"the body holds more than {MAX_JSON_VALUES} JSON values",
    }
    # The body itself is held (30 MiB) and scanned; parsing it would have taken ~700 MiB.
    assert _peak_rss_mib(node) - before < 160
    assert httpx.get(node.url + "/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "encoded",
    [
        "[1]".encode("utf-16-le"),
        "[1]".encode("utf-16"),  # with its byte order mark
        "[1]".encode("utf-32"),
        b"\xef\xbb\xbf[1]",  # UTF-8's byte order mark
    ],
    ids=["utf-16-le", "utf-16", "utf-32", "utf-8-bom"],
)
def test_only_utf_8_json_is_parsed(encoded: bytes) -> None:
    """From review: `json.loads` of bytes takes UTF-16 and UTF-32 too, which the value count
    does not read as JSON: 32 MiB of `[1,1,...]` in UTF-16 went uncounted and built 5.6
    million values. RFC 8259 asks for UTF-8: the rest is not JSON here."""
    from app.deps import strict_json
    from app.p2p.refusals import parse_json

    assert parse_json(encoded) is None
    with pytest.raises(json.JSONDecodeError):
        strict_json(encoded)
    assert parse_json(b"[1]") == [1]
