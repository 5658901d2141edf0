"""`entraide requests list|show` at a terminal, against real node processes.

ES/MJ sends requests to AR/MPF through the local API; the commands are run as a person runs
them (`python -m app requests ...`, ENTRAIDE_URL and ENTRAIDE_TOKEN), and what they print is
checked against what the same API answers. (Refusals, and a node that cannot be reached:
test_requests_cli_refusals.py; two files, so that two test processes share them.)"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

from app.localnodes import LocalNode
from tests.e2e.conftest import EXAMPLE, Network, read_request, wait_delivered, wait_for
from tests.requests_cli import run_requests


def entraide(
    node: LocalNode, *args: str, token: str | None = None, url: str | None = None
) -> subprocess.CompletedProcess[str]:
    token = node.tokens["officer"] if token is None else token
    # A wide terminal: one table row per request.
    return run_requests(url or node.url, token, *args, env={"COLUMNS": "200"})


def succeeds(node: LocalNode, *args: str) -> subprocess.CompletedProcess[str]:
    done = entraide(node, *args)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def listed_json(node: LocalNode, *args: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(succeeds(node, "list", "--json", *args).stdout)
    return items


def api_list(node: LocalNode, **params: str) -> list[dict[str, Any]]:
    """Every item the API lists with these filters, page after page."""
    items: list[dict[str, Any]] = []
    cursor = None
    with node.client("officer") as http:
        while True:
            query = {**params, "limit": "200", **({"cursor": cursor} if cursor else {})}
            response = http.get("/api/v1/requests", params=query)
            assert response.status_code == 200, response.text
            items.extend(response.json()["items"])
            cursor = response.json()["next_cursor"]
            if cursor is None:
                return items


def acknowledge(node: LocalNode, request_id: str) -> None:
    with node.client("officer") as http:
        response = http.post(
            f"/api/v1/requests/{request_id}/messages",
            json={"document": {"type": "acknowledgement", "text": "Registered."}},
        )
    assert response.status_code == 201, response.text


def send_three(network: Network) -> list[str]:
    """Three requests from ES/MJ, delivered, the newest acknowledged by AR/MPF."""
    ids = []
    with network.es.client("officer") as http:
        for _ in range(3):
            response = http.post("/api/v1/requests", json=EXAMPLE)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    for request_id in ids:
        wait_delivered(network.es, request_id)
    acknowledge(network.ar, ids[-1])
    wait_for("the acknowledgement at ES", lambda: read_request(network.es, ids[-1])["status"])
    wait_for(
        "the acknowledgement at ES",
        lambda: read_request(network.es, ids[-1])["status"] == "acknowledged",
    )
    return ids


def test_list_shows_what_the_api_lists_page_by_page_and_filtered(network: Network) -> None:
    ids = send_three(network)
    es, ar = network.es, network.ar
    # Everything, every page followed (pages of one: three requests and more need three
    # pages at least), exactly as the API lists it.
    everything = listed_json(es, "--all", "--limit", "1")
    assert everything == api_list(es)
    assert [item["id"] for item in everything[:3]] == ids[::-1]  # newest first

    # One page: the next one is said on stderr, and --cursor gives it.
    first = succeeds(es, "list", "--json", "--limit", "2")
    assert [item["id"] for item in json.loads(first.stdout)] == ids[:0:-1]
    cursor = first.stderr.split("--cursor ", 1)[1].split()[0]
    second = listed_json(es, "--limit", "2", "--cursor", cursor)
    assert second[0]["id"] == ids[0]

    # Filters, each as the API applies it.
    acknowledged = listed_json(ar, "--status", "acknowledged", "--direction", "inbound")
    assert [item["id"] for item in acknowledged] == [ids[-1]]
    assert acknowledged == api_list(ar, status="acknowledged", direction="inbound")
    assert listed_json(es, "--direction", "inbound") == []
    assert {item["id"] for item in listed_json(es, "--peer", "AR/MPF", "--all")} >= set(ids)
    assert listed_json(es, "--peer", "FR/DACG") == []
    # Freshly received: none is overdue, each is due within weeks (a week to acknowledge, the
    # requested date to decide).
    assert listed_json(ar, "--overdue") == api_list(ar, overdue="true") == []
    assert {item["id"] for item in listed_json(ar, "--not-overdue", "--all")} >= set(ids)
    later = (datetime.now(UTC) + timedelta(days=60)).date().isoformat()
    due = listed_json(ar, "--due-before", later, "--all")
    assert {item["id"] for item in due} >= set(ids)
    assert due == api_list(ar, due_before=f"{later}T00:00:00+00:00")
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    assert listed_json(ar, "--due-before", yesterday) == []

    # The table: one row per request, with its direction, peer, status, urgency and due date.
    table = succeeds(ar, "list", "--direction", "inbound", "--all").stdout.splitlines()
    header = ["id", "direction", "peer", "status", "urgency", "due", "(UTC)", "overdue"]
    assert table[0].split() == header
    rows = {line.split()[0]: line.split() for line in table[1:]}
    for item in api_list(ar, direction="inbound"):
        due_at = datetime.fromisoformat(item["due_at"]).strftime("%Y-%m-%d %H:%M").split()
        expected = [item["id"], "inbound", "ES/MJ", item["status"], item["urgency"], *due_at]
        assert rows[item["id"]] == expected
    assert rows[ids[-1]][3] == "acknowledged"
    # Nothing matches: said on stderr, nothing on stdout.
    none = succeeds(es, "list", "--direction", "inbound")
    assert none.stdout == ""
    assert "no request matches" in none.stderr


def test_show_prints_the_conversation_as_the_api_reads_it(network: Network) -> None:
    es, ar = network.es, network.ar
    with es.client("officer") as http:
        response = http.post("/api/v1/requests", json=EXAMPLE)
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]
    wait_delivered(es, request_id)
    acknowledge(ar, request_id)
    detail = wait_for(
        "the acknowledgement at ES",
        lambda: (
            (found := read_request(es, request_id))["status"] == "acknowledged"
            and all(message["receipt"] for message in found["messages"])
            and found
        ),
    )

    # --json: the API's answer, as it gives it (the read itself is the same).
    raw = json.loads(succeeds(es, "show", request_id, "--json").stdout)
    assert raw["id"] == request_id
    assert raw["messages"] == detail["messages"]
    assert raw["document"] == detail["document"]

    shown = succeeds(es, "show", request_id).stdout
    lines = [line.split() for line in shown.splitlines()]
    assert ["request", request_id] in lines
    assert ["outbound,", "to", "AR/MPF"] in lines
    assert ["type", EXAMPLE["document"]["request_type"]] in lines
    assert ["status", "acknowledged"] in lines
    assert ["urgency", "urgent"] in lines
    requested = EXAMPLE["document"]["urgency"]["requested_date"]
    assert ["requested", "date", requested] in lines
    assert ["messages", "(2,", "oldest", "first)"] in lines
    # The messages in order: the request, sent and delivered with its receipt, then AR/MPF's
    # acknowledgement, received here (the receipt is the one this node issued).
    request = detail["messages"][0]
    first, second = shown.split("\n1. ", 1)[1].split("\n2. ")
    assert first.startswith("request, outbound: ES/MJ -> AR/MPF")
    assert f"msg_id       {request['msg_id']}" in first
    attempts = request["delivery"]["attempts"]
    assert f"delivery     delivered, {attempts} attempt" in first
    assert f"(key {request['receipt']['signer_kid']}), envelope {request['envelope_hash']}" in first
    received = datetime.fromisoformat(request["receipt"]["received_at"])
    assert f"received     {received:%Y-%m-%d %H:%M:%S} UTC" in first
    letter = base64.b64decode(EXAMPLE["attachments"][0]["content_base64"])
    assert f"1. letter-of-request.txt  text/plain  {len(letter)} bytes" in first or (
        f"({len(letter)} bytes)" in first
    )
    assert f"sha256 {hashlib.sha256(letter).hexdigest()}" in first
    assert second.startswith("acknowledgement, inbound: AR/MPF -> ES/MJ")
    assert f"in reply to  {request['msg_id']}" in second
    assert "signed by this node" in second
    assert "delivery" not in second  # this node does not deliver what it received
    # AR/MPF sees the same conversation from its side.
    at_ar = succeeds(ar, "show", request_id).stdout
    assert ["inbound,", "from", "ES/MJ"] in [line.split() for line in at_ar.splitlines()]
    assert "\n2. acknowledgement, outbound: AR/MPF -> ES/MJ" in at_ar
