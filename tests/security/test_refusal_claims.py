"""What a refused envelope claims is read cheaply (app/p2p/refusals.py): a header past the
size bound is never parsed, since anyone can post one and its parse would cost us seconds."""

from __future__ import annotations

import base64
import json

from app.p2p.refusals import Claimed, claimed_routing, parse_json
from tests.crypto.test_envelope import fr, seal


def test_a_refused_envelope_within_the_bound_names_its_claimed_sender() -> None:
    wire = seal().to_wire()
    header = json.loads(base64.b64decode(wire["header"]))
    claimed = claimed_routing(wire, max_header_bytes=64 * 1024)
    assert claimed == Claimed(fr().authority, header["msg_id"])


def test_a_header_past_the_bound_is_not_parsed() -> None:
    wire = seal().to_wire()
    size = len(base64.b64decode(wire["header"]))
    assert claimed_routing(wire, max_header_bytes=size) != Claimed()
    assert claimed_routing(wire, max_header_bytes=size - 4) == Claimed()  # base64 rounds up
    # What the review measured: megabytes of nested objects, seconds of parsing, were parsed
    # inside the refusal's write transaction. Now refused without a look.
    nested = b'{"a":[' + b"{}," * 1_000_000 + b"{}]}"
    hostile = {"v": 1, "signature": "", "parts": ["AA=="], "header": base64.b64encode(nested)}
    hostile["header"] = hostile["header"].decode()
    assert claimed_routing(hostile, max_header_bytes=64 * 1024) == Claimed()


def test_anything_else_claims_nothing() -> None:
    for wire in (None, [], {"header": 5}, {"header": "!!"}, {"header": "e30=", "parts": 3}):
        assert claimed_routing(wire, max_header_bytes=64 * 1024) == Claimed()


def test_bodies_that_are_not_json_parse_to_none() -> None:
    assert parse_json(b'{"v": 1}') == {"v": 1}
    for raw in (b"\xff", b"{", b"[" * 100_000, b"1" * 5000):
        assert parse_json(raw) is None


def test_an_announcement_names_its_claimed_sender_too() -> None:
    wire = seal(attachments=[b"evidence", b"more evidence"]).to_wire()
    announced = {**wire, "parts": wire["parts"][:1]}  # app/evidence: part 0 travels alone
    assert claimed_routing(announced, max_header_bytes=64 * 1024).sender == fr().authority


def test_nesting_deep_enough_to_recurse_claims_nothing_and_raises_nothing() -> None:
    # A depth that json.loads accepts and json.dumps cannot write back: once a 500 that the
    # refusal throttle never counted. Every depth around it, in canonical form.
    for depth in range(3000):  # the window depends on the stack already in use: all of them
        nested = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
        wire = {"v": 1, "signature": "", "parts": [], "header": base64.b64encode(nested).decode()}
        assert claimed_routing(wire, max_header_bytes=64 * 1024) == Claimed()
