"""`entraide_envelopes_refused_total` and a throttled address (app/main.py, app/deps.py).

From review: a call to the peer API refused before its route (a NUL in the query, a path the
API does not have) was counted there before the address throttle was looked at, so an
address already answered 429 on the routes raised the figure operators alert on by one a
call, for free and without limit. Such refusals now count as the routes' do: while the
address is counted against its limit, not once it is blocked.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import Databases
from tests.requests.conftest import Harness, serve_node


def _refused(ar: Harness, code: str) -> float:
    text = ar.get("/metrics", client="monitor").text
    series = re.escape(f'entraide_envelopes_refused_total{{code="{code}"}}')
    found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_blocked_address_no_longer_raises_the_refused_envelopes_metric(
    databases: Databases, tmp_path: Path
) -> None:
    with serve_node(databases.new("ar", migrated=True), tmp_path) as ar:
        ar.node.settings.p2p_refusal_limit = 3  # this test's node only
        # Counted while the address is: a refusal before the route, then two of the route's.
        nul = ar.http.get("/p2p/v1/envelopes?x=%00")
        assert (nul.status_code, nul.json()["error"]) == (400, "invalid_request")
        assert _refused(ar, "invalid_request") == 1
        for _ in range(2):
            answer = ar.http.post("/p2p/v1/envelopes", json={"v": 1})
            assert (answer.status_code, answer.json()["error"]) == (400, "malformed_envelope")
        assert _refused(ar, "malformed_envelope") == 2
        blocked = ar.http.post("/p2p/v1/envelopes", json={"v": 1})
        assert (blocked.status_code, blocked.json()["error"]) == (429, "rate_limited")
        # Blocked: still refused as before, and on no count.
        for _ in range(20):
            assert ar.http.get("/p2p/v1/envelopes?x=%00").status_code == 400
            assert ar.http.get("/p2p/v1/nothing").status_code == 404
        assert _refused(ar, "invalid_request") == 1
        assert _refused(ar, "not_found") == 0
        assert _refused(ar, "malformed_envelope") == 2
        assert _refused(ar, "rate_limited") == 0
        audited = [outcome for _, outcome, _ in ar.audit("envelope.refused")]
        assert audited == ["invalid_request", "malformed_envelope", "malformed_envelope"]


def test_envelopes_refused_inside_a_batch_are_counted_as_single_posts_are(
    databases: Databases, tmp_path: Path
) -> None:
    """From an earlier note: a batch is answered 200 with one refusal per envelope; those
    were audited but raised no count, so a peer sending only batches of bad envelopes never
    showed on the figure operators alert on."""
    with serve_node(databases.new("ar", migrated=True), tmp_path) as ar:
        single = ar.http.post("/p2p/v1/envelopes", json={"v": 1})
        assert (single.status_code, single.json()["error"]) == (400, "malformed_envelope")
        assert _refused(ar, "malformed_envelope") == 1
        batch = ar.http.post(
            "/p2p/v1/envelopes/batch",
            json={"v": 1, "request_ids": [None, None], "envelopes": [{"v": 1}, {"v": 1}]},
        )
        assert batch.status_code == 200, batch.text
        codes = [(item["status"], item["error"]) for item in batch.json()["results"]]
        assert codes == [(400, "malformed_envelope")] * 2
        assert _refused(ar, "malformed_envelope") == 3
        audited = [outcome for _, outcome, _ in ar.audit("envelope.refused")]
        assert audited == ["malformed_envelope"] * 3
