"""An inner manifest is counted before it is parsed, and parsed once per transfer (from review).

Step 1 counts the values of a body before parsing it, but an envelope's part 0 is ciphertext
there: once decrypted, a pinned peer's manifest of 7 million empty lists (28 MB, within the
body limit) was parsed whole, 690 MiB and 8 s of a node's interpreter, and only then refused
by the content's schema. A streamed envelope's manifest was decrypted and parsed again for
every PUT of a part, an empty one included (answered 204, so never counted against the peer).
Now part 0 is held to step 1's bound (`413 too_large`, on record, nothing stored), and a
transfer's manifest is opened once for all its PUTs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.crypto.encoding import b64d
from app.evidence import inbound
from app.jsonvalues import MAX_JSON_VALUES
from tests.requests.conftest import Harness, example_document
from tests.requests.test_carriage import _announce, _put_part


def _bomb(ar: Harness) -> dict[str, Any]:
    """An envelope from ES/MJ, sealed as its node seals, whose manifest holds more values
    than any valid one: every one an empty list inside the document."""
    document: dict[str, Any] = {**example_document(), "padding": [[]] * (MAX_JSON_VALUES + 1)}
    return ar._seal({"kind": "request", "document": document}, None, None).to_wire()


def _refused_unstored(ar: Harness, answer: dict[str, Any], before: int) -> None:
    assert (answer.get("status"), answer["error"]) == (413, "too_large"), answer
    assert str(MAX_JSON_VALUES) in answer["detail"]
    refused = ar.audit("envelope.refused")[before:]
    assert [(actor, code) for actor, code, _ in refused] == [("peer:ES/MJ", "too_large")]


def test_a_manifest_of_too_many_values_posted_whole_is_refused_unparsed(ar: Harness) -> None:
    wire = _bomb(ar)
    msg_id = json.loads(b64d(str(wire["header"])))["msg_id"]
    before = len(ar.audit("envelope.refused"))
    posted = ar.http.post("/p2p/v1/envelopes", json=wire)
    assert posted.status_code == 413, posted.text
    _refused_unstored(ar, {"status": 413, **posted.json()}, before)
    assert ar.messages(msg_id) == 0


def test_a_manifest_of_too_many_values_in_a_batch_is_that_envelope_s_refusal(
    ar: Harness,
) -> None:
    good = ar._seal({"kind": "request", "document": example_document()}, None, None).to_wire()
    before = len(ar.audit("envelope.refused"))
    posted = ar.http.post("/p2p/v1/envelopes/batch", json={"v": 1, "envelopes": [_bomb(ar), good]})
    assert posted.status_code == 200, posted.text
    bomb_answer, good_answer = posted.json()["results"]
    _refused_unstored(ar, bomb_answer, before)
    assert good_answer["status"] == 201


def test_a_manifest_of_too_many_values_announced_is_refused_unparsed(ar: Harness) -> None:
    before = len(ar.audit("envelope.refused"))
    announced = _announce(ar, _bomb(ar))
    assert announced.status_code == 413, announced.text
    _refused_unstored(ar, {"status": 413, **announced.json()}, before)


def test_a_transfer_s_manifest_is_opened_once_for_all_its_puts(
    fresh_ar: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    ar = fresh_ar
    opened = []
    manifest = inbound._manifest

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(args[0].msg_id)
        return manifest(*args, **kwargs)

    monkeypatch.setattr(inbound, "_manifest", counted)  # counts, and opens as ever
    wire = ar._seal({"kind": "request", "document": example_document()}, None, None).to_wire()
    msg_id = json.loads(b64d(str(wire["header"])))["msg_id"]
    assert _announce(ar, wire).status_code == 202
    assert opened == [msg_id]  # the announcement's check
    for _ in range(5):
        assert _put_part(ar, msg_id, b"").status_code == 204
    part = b64d(wire["parts"][1])
    assert _put_part(ar, msg_id, part).status_code == 201  # the receipt: complete
    # Once more for the PUTs, then the completion's own check of the whole envelope.
    assert opened == [msg_id] * 3
