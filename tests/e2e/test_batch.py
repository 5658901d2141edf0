"""Several envelopes in one peer call (docs/protocol.md section 8.6), against a real node.

Each envelope of a batch must get exactly the answer a single post would have given it: a
verifiable receipt, the stored receipt for a repeat, or its refusal code, audited, with
nothing of it stored; and a refused envelope must not keep the others from being stored.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from app.crypto.envelope import Recipient, WireEnvelope, parse_header
from app.crypto.identity import parse_identity_document
from app.crypto.keys import NodeKeys
from app.crypto.receipts import decode_receipt, verify_receipt
from app.p2p.batch import MAX_REFUSED_PER_BATCH
from app.peers.client import MAX_BATCH_ENVELOPES
from tests.e2e.conftest import Network, audit_outcomes, count_messages
from tests.e2e.test_tampering import _flip, _seal

BATCH = "/p2p/v1/envelopes/batch"


def post_batch(network: Network, envelopes: list[object]) -> httpx.Response:
    return httpx.post(network.ar.url + BATCH, json={"v": 1, "envelopes": envelopes}, timeout=30.0)


def _verified(network: Network, envelope: WireEnvelope, answer: dict[str, Any]) -> None:
    identity = parse_identity_document(
        httpx.get(network.ar.url + "/.well-known/entraide/node").json()
    )
    signed = decode_receipt({"receipt": answer["receipt"], "signature": answer["signature"]})
    parsed = parse_header(envelope.header, len(envelope.parts))
    verify_receipt(
        signed,
        signer_public=identity.signing.public_key,
        msg_id=parsed.msg_id,
        envelope_hash=envelope.envelope_hash,
        from_authority="ES/MJ",
        to_authority="AR/MPF",
    )


def test_each_envelope_gets_its_own_answer_in_order(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    first, second, third = (_seal(es_keys, "ES/MJ", ar_recipient) for _ in range(3))
    tampered = _seal(es_keys, "ES/MJ", ar_recipient)
    tampered = WireEnvelope(
        tampered.header, tampered.signature, [tampered.parts[0], _flip(tampered.parts[1], 5)]
    )
    stored_before = count_messages(network, network.ar)
    refusals_before = audit_outcomes(network, network.ar, "envelope.refused")

    batch = [first, second, tampered, third, first]  # the last is a repeat, in the same batch
    response = post_batch(network, [envelope.to_wire() for envelope in batch])

    assert response.status_code == 200, response.text
    answers = response.json()["results"]
    assert [answer["status"] for answer in answers] == [201, 201, 400, 201, 200]
    assert answers[2] == {
        "status": 400,
        "error": "part_hash_mismatch",
        "detail": answers[2]["detail"],
    }
    for envelope, answer in zip(batch, answers, strict=True):
        if answer["status"] in (200, 201):
            _verified(network, envelope, answer)
    # The repeat is answered with the stored receipt, byte for byte.
    assert answers[4]["receipt"] == answers[0]["receipt"]
    assert answers[4]["signature"] == answers[0]["signature"]
    # Three stored, the tampered one not; its refusal audited with its code.
    assert count_messages(network, network.ar) == stored_before + 3
    assert audit_outcomes(network, network.ar, "envelope.refused") == [
        *refusals_before,
        "part_hash_mismatch",
    ]

    # Posted again (a sender that lost the answer): the same receipts, nothing new stored.
    again = post_batch(network, [first.to_wire(), second.to_wire(), third.to_wire()])
    assert [answer["status"] for answer in again.json()["results"]] == [200, 200, 200]
    assert [answer["receipt"] for answer in again.json()["results"]] == [
        answers[0]["receipt"],
        answers[1]["receipt"],
        answers[3]["receipt"],
    ]
    assert count_messages(network, network.ar) == stored_before + 3


def test_malformed_elements_are_refused_one_by_one(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    good = _seal(es_keys, "ES/MJ", ar_recipient)
    stored_before = count_messages(network, network.ar)
    response = post_batch(network, [1, {"v": 2}, good.to_wire(), []])
    assert response.status_code == 200, response.text
    answers = response.json()["results"]
    assert [(answer["status"], answer.get("error")) for answer in answers] == [
        (400, "malformed_envelope"),
        (400, "malformed_envelope"),
        (201, None),
        (400, "malformed_envelope"),
    ]
    assert count_messages(network, network.ar) == stored_before + 1


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"v": 1}',
        b'{"v": 1, "envelopes": []}',
        b'{"v": 1, "envelopes": {}}',
        b'{"v": 2, "envelopes": [{}]}',
        b'{"v": 1, "envelopes": [{}], "more": 1}',
    ],
)
def test_malformed_batches(network: Network, body: bytes) -> None:
    stored_before = count_messages(network, network.ar)
    refusals_before = audit_outcomes(network, network.ar, "envelope.refused")
    response = httpx.post(
        network.ar.url + BATCH,
        content=body,
        headers={"content-type": "application/json"},
        timeout=30.0,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "malformed_batch"
    assert count_messages(network, network.ar) == stored_before
    assert audit_outcomes(network, network.ar, "envelope.refused") == [
        *refusals_before,
        "malformed_batch",
    ]


def test_too_many_envelopes(network: Network) -> None:
    response = post_batch(network, [{}] * (MAX_BATCH_ENVELOPES + 1))
    assert response.status_code == 413
    assert response.json()["error"] == "too_many_envelopes"


def test_a_batch_of_refusals_is_checked_no_further_than_a_few(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    # Ten tampered envelopes: eight refused with their code and audited, then the batch is
    # checked no further (what ten single posts would cost before the throttle, no more).
    tampered = []
    for _ in range(MAX_REFUSED_PER_BATCH + 2):
        envelope = _seal(es_keys, "ES/MJ", ar_recipient)
        parts = [envelope.parts[0], _flip(envelope.parts[1], 5)]
        tampered.append(WireEnvelope(envelope.header, envelope.signature, parts).to_wire())
    good = _seal(es_keys, "ES/MJ", ar_recipient)
    refusals_before = audit_outcomes(network, network.ar, "envelope.refused")
    stored_before = count_messages(network, network.ar)

    response = post_batch(network, [*tampered, good.to_wire()])

    assert response.status_code == 200, response.text
    answers = response.json()["results"]
    assert [answer.get("error") for answer in answers] == [
        *["part_hash_mismatch"] * MAX_REFUSED_PER_BATCH,
        *["rate_limited"] * 3,
    ]
    assert [answer["status"] for answer in answers[MAX_REFUSED_PER_BATCH:]] == [429] * 3
    assert count_messages(network, network.ar) == stored_before
    assert audit_outcomes(network, network.ar, "envelope.refused") == [
        *refusals_before,
        *["part_hash_mismatch"] * MAX_REFUSED_PER_BATCH,
    ]


def test_each_envelope_is_logged_under_its_senders_request_id(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient
) -> None:
    first, second = (_seal(es_keys, "ES/MJ", ar_recipient) for _ in range(2))
    trace = f"case-{uuid.uuid4().hex[:12]}"
    response = httpx.post(
        network.ar.url + BATCH,
        json={
            "v": 1,
            "envelopes": [first.to_wire(), second.to_wire()],
            "request_ids": [trace, None],
        },
        timeout=30.0,
    )
    assert [answer["status"] for answer in response.json()["results"]] == [201, 201]
    lines = [
        json.loads(line)
        for line in network.ar.log_path.read_text().splitlines()
        if line.startswith("{") and trace in line
    ]
    assert [line["message"] for line in lines] == ["envelope 1 of 2 in a batch: 201 accepted"]
    assert lines[0]["request_id"] == trace


@pytest.mark.parametrize("request_ids", [[], ["a"], ["a", "b", "c"], [1, None], "a", {"a": 1}])
def test_malformed_request_ids(
    network: Network, es_keys: NodeKeys, ar_recipient: Recipient, request_ids: object
) -> None:
    envelopes = [_seal(es_keys, "ES/MJ", ar_recipient).to_wire() for _ in range(2)]
    stored_before = count_messages(network, network.ar)
    response = httpx.post(
        network.ar.url + BATCH,
        json={"v": 1, "envelopes": envelopes, "request_ids": request_ids},
        timeout=30.0,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "malformed_batch"
    assert count_messages(network, network.ar) == stored_before
