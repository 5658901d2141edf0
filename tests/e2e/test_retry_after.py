"""A peer that sheds load says when to come back (429 or 503 with Retry-After): the sender
waits that long, not its own shorter back-off (real node processes; the receiver's own
throttle answers the 429)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import httpx

from app.localnodes import LocalNode
from tests.conftest import migrated_sqlite
from tests.e2e.conftest import submit_example, wait_for

BLOCK_SECONDS = 300


def _delivery(node: LocalNode) -> dict[str, object]:
    with node.client("admin") as http:
        (row,) = http.get("/api/v1/admin/deliveries").json()["items"]
    return dict(row)


def test_the_sender_waits_as_long_as_the_peer_asked(tmp_path: Path) -> None:
    limits = {
        "ENTRAIDE_P2P_REFUSAL_LIMIT": "2",
        "ENTRAIDE_AUTH_BLOCK_SECONDS": str(BLOCK_SECONDS),
    }
    es = LocalNode("ES/MJ", "Ministerio", tmp_path / "es", migrated_sqlite(tmp_path / "es.db"))
    ar = LocalNode(
        "AR/MPF", "Fiscal", tmp_path / "ar", migrated_sqlite(tmp_path / "ar.db"), extra_env=limits
    )
    try:
        for node in (es, ar):
            node.init(clients={"admin": ("admin",), "officer": ("officer",)})
            node.start()
        es.pin(ar)
        ar.pin(es)
        # Refused envelopes from this machine's address (ES's too) until AR blocks it.
        for _ in range(3):
            httpx.post(ar.url + "/p2p/v1/envelopes", json={"v": 1}, timeout=10.0)
        blocked = httpx.post(ar.url + "/p2p/v1/envelopes", json={"v": 1}, timeout=10.0)
        assert blocked.status_code == 429
        asked = int(blocked.headers["retry-after"])
        assert asked > BLOCK_SECONDS - 30

        submit_example(es)
        row = wait_for("a refused attempt", lambda: (r := _delivery(es))["attempts"] and r)
        row = wait_for("its settlement", lambda: (r := _delivery(es))["state"] == "retry" and r)
        assert str(row["last_error"]).startswith("HTTP 429 rate_limited")
        (attempt,) = row["history"]  # type: ignore[misc]
        finished = datetime.fromisoformat(str(attempt["finished_at"]))
        next_at = datetime.fromisoformat(str(row["next_attempt_at"]))
        # Its own back-off after a first attempt is one to two seconds.
        assert (next_at - finished).total_seconds() >= asked - 30
    finally:
        es.stop()
        ar.stop()
