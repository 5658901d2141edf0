"""The whole life of a request between two real nodes: after every step both nodes hold the
same signed messages and show the same status; a forbidden step is refused by the sender's
node at submission and, forged with the sender's real keys, by the receiver's node.

Collected from test_exchange.py, so that it runs on that module's network of real nodes
instead of starting one of its own.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta
from typing import Any

import httpx

from app.crypto.encoding import utc_now
from app.crypto.envelope import Recipient, seal
from app.crypto.identity import parse_identity_document
from app.crypto.keys import load_keys
from app.crypto.randomness import SystemRandomness
from app.localnodes import LocalNode
from tests.e2e.conftest import (
    Network,
    audit_outcomes,
    count_messages,
    post_envelope,
    read_request,
    submit_example,
    wait_delivered,
    wait_for,
)

REPORT = b"Banco Ejemplo Argentino S.A. - account opening file, statements Aug-Nov 2026\n"


def _evidence(ref: str, data: bytes, attachment: int) -> dict[str, Any]:
    return {
        "ref": ref,
        "description": "Bank records produced under the production order",
        "obtained_at": "2026-11-19T15:00:00-03:00",
        "obtained_from": "Banco Ejemplo Argentino S.A.",
        "sha256": hashlib.sha256(data).hexdigest(),
        "attachment": attachment,
        "use_limitation": "Only in proceedings DP 1873/2026.",
        "custody": [
            {"at": "2026-11-19T16:30:00-03:00", "action": "received", "by": "Fiscalía n.º 12"}
        ],
    }


def _file(name: str, data: bytes) -> dict[str, str]:
    return {
        "name": name,
        "media_type": "text/plain",
        "content_base64": base64.b64encode(data).decode(),
    }


class Conversation:
    def __init__(self, network: Network, request_id: str) -> None:
        self.network = network
        self.request_id = request_id
        self.path = f"/api/v1/requests/{request_id}"

    def views(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return read_request(self.network.es, self.request_id), read_request(
            self.network.ar, self.request_id
        )

    def agreed(self, status: str) -> list[str]:
        """Wait until both nodes hold the same messages and show `status`; their types."""

        def same() -> list[str] | None:
            es, ar = self.views()
            types = [m["msg_id"] for m in es["messages"]]
            if types != [m["msg_id"] for m in ar["messages"]]:
                return None
            if es["status"] != status or ar["status"] != status:
                return None
            return [str(m["content"].get("type", "request")) for m in es["messages"]]

        result: list[str] = wait_for(f"both nodes at {status}", same)
        return result

    def send(
        self,
        node: LocalNode,
        document: dict[str, Any],
        status: str,
        attachments: list[dict[str, str]] | None = None,
    ) -> list[str]:
        with node.client("officer") as http:
            body = {"document": document, "attachments": attachments or []}
            response = http.post(f"{self.path}/messages", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["status"] == status  # the sender's node moved at once
        return self.agreed(status)

    def refused_at_submission(self, node: LocalNode, document: dict[str, Any], code: str) -> None:
        with node.client("officer") as http:
            response = http.post(f"{self.path}/messages", json={"document": document})
        assert response.status_code == 409, response.text
        assert response.json()["error"] == code


def test_the_full_life_of_a_request_seen_alike_by_both_nodes(network: Network) -> None:
    es, ar = network.es, network.ar
    request_id = submit_example(es)
    wait_delivered(es, request_id)
    life = Conversation(network, request_id)
    assert life.agreed("delivered") == ["request"]

    steps: list[tuple[LocalNode, dict[str, Any], str]] = [
        (
            ar,
            {"type": "acknowledgement", "text": "Registered as AR-MPF-2026-4417."},
            "acknowledged",
        ),
        (
            ar,
            {"type": "additional_information_request", "text": "Which period exactly?"},
            "additional_information_requested",
        ),
        (
            es,
            {"type": "additional_information", "text": "1 August 2026 to execution."},
            "additional_information_supplied",
        ),
        (
            ar,
            {"type": "consultation", "text": "May the bank be told?"},
            "additional_information_supplied",
        ),
        (
            es,
            {"type": "consultation", "text": "No: no tipping off."},
            "additional_information_supplied",
        ),
        (ar, {"type": "acceptance", "text": "Accepted.", "conditions": "As asked."}, "accepted"),
        (es, {"type": "status_query", "text": "Any news?"}, "accepted"),
        (ar, {"type": "status_answer", "text": "The bank has been ordered."}, "accepted"),
        (
            ar,
            {
                "type": "postponement",
                "text": "Postponed.",
                "reason": "The bank's compliance office asked for two weeks.",
                "until": str((utc_now() + timedelta(days=16)).date()),
            },
            "postponed",
        ),
        (ar, {"type": "acceptance", "text": "Execution resumes."}, "accepted"),
    ]
    for node, document, status in steps:
        life.send(node, document, status)

    # Forbidden now, refused by the sender's own node before anything is sealed ...
    life.refused_at_submission(es, {"type": "closure", "text": "Done?"}, "transition_not_allowed")
    life.refused_at_submission(es, {"type": "acceptance", "text": "x"}, "message_not_allowed")
    life.refused_at_submission(
        ar, {"type": "acknowledgement", "text": "x"}, "transition_not_allowed"
    )
    # ... and, forged with ES/MJ's real keys and posted straight to AR/MPF, by the receiver.
    _forged_closure_is_refused(network, request_id)
    assert life.agreed("accepted")

    partial = {
        "type": "partial_result",
        "text": "The bank records.",
        "evidence": [_evidence("E1", REPORT, 1)],
    }
    life.send(ar, partial, "partially_executed", [_file("bank.txt", REPORT)])
    subscriber = b"Servicios Digitales Ejemplo S.A. - subscriber data\n"
    result = {
        "type": "result",
        "text": "The provider's records.",
        "evidence": [_evidence("E2", subscriber, 1)],
    }
    life.send(ar, result, "executed", [_file("provider.txt", subscriber)])
    types = life.send(es, {"type": "closure", "text": "Results received, thank you."}, "closed")
    assert types == [
        "request",
        *[document["type"] for _, document, _ in steps],
        "partial_result",
        "result",
        "closure",
    ]

    # The requesting authority holds the evidence exactly as attested.
    es_view, ar_view = life.views()
    assert es_view["allowed_messages"] == ar_view["allowed_messages"] == []
    with es.client("officer") as http:
        for message, data in (
            (es_view["messages"][-3], REPORT),
            (es_view["messages"][-2], subscriber),
        ):
            item = message["content"]["evidence"][0]
            downloaded = http.get(message["attachments"][item["attachment"] - 1]["href"]).content
            assert downloaded == data
            assert hashlib.sha256(downloaded).hexdigest() == item["sha256"]
    # Closed on both: nothing moves it any more, on either side.
    life.refused_at_submission(ar, {"type": "note", "text": "x"}, "transition_not_allowed")
    life.refused_at_submission(es, {"type": "withdrawal", "text": "x"}, "transition_not_allowed")


def _forged_closure_is_refused(network: Network, request_id: str) -> None:
    """An insider at ES/MJ with the node's keys, skipping its own node's check."""
    es_keys = load_keys(network.es.keys_dir)
    ar_identity = parse_identity_document(
        httpx.get(network.ar.url + "/.well-known/entraide/node", timeout=10).json()
    )
    latest = read_request(network.ar, request_id)["messages"][-1]["msg_id"]
    envelope = seal(
        sender_keys=es_keys,
        sender_authority="ES/MJ",
        recipient=Recipient("AR/MPF", ar_identity.encryption.public_key),
        content={"kind": "message", "document": {"type": "closure", "text": "Closed."}},
        attachments=[],
        conversation_id=request_id,
        in_reply_to=latest,
        created_at=utc_now(),
        ttl=timedelta(days=1),
        randomness=SystemRandomness(),
    )
    stored = count_messages(network, network.ar)
    refusals = audit_outcomes(network, network.ar, "envelope.refused")
    response = post_envelope(network.ar, envelope.to_wire())
    assert response.status_code == 409, response.text
    assert response.json()["error"] == "transition_not_allowed"
    assert count_messages(network, network.ar) == stored, "a refused envelope was stored"
    assert audit_outcomes(network, network.ar, "envelope.refused") == [
        *refusals,
        "transition_not_allowed",
    ]
    assert read_request(network.ar, request_id)["status"] == "accepted"
