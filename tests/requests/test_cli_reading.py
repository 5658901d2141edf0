"""`entraide requests list|show` against a node whose clock the test holds (tests/requests/
conftest.py), so that deadlines pass, and whose peer chooses what the names say.

The commands run as a person runs them (`python -m app requests ...`, ENTRAIDE_URL and
ENTRAIDE_TOKEN), against the real application served on a loopback port."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from app.crypto.encoding import utc_now
from app.crypto.envelope import Attachment
from tests.requests.conftest import Harness
from tests.requests_cli import run_requests


def run(ar: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    return run_requests(str(ar.http.base_url), ar.tokens["officer"], *args)


def entraide(ar: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    done = run(ar, *args)
    assert done.returncode == 0, done.stderr
    return done


def api_items(ar: Harness, **params: Any) -> dict[str, dict[str, Any]]:
    response = ar.get("/api/v1/requests", limit=200, **params)
    assert response.status_code == 200, response.text
    assert response.json()["next_cursor"] is None
    return {item["id"]: item for item in response.json()["items"]}


def test_the_table_marks_what_is_overdue_by_the_nodes_clock(ar: Harness) -> None:
    waiting = ar.receive_request(urgency={"level": "routine"})
    acknowledged = ar.receive_request(urgency={"level": "routine"})
    reply = {"type": "acknowledgement", "text": "Registered."}
    assert ar.reply(acknowledged, reply).status_code == 201
    mine = {waiting, acknowledged}
    # Eight days on: the acknowledgement (a week by default) is late, the decision is not.
    ar.clock.now = utc_now() + timedelta(days=8)
    try:
        listed = api_items(ar)
        assert listed[waiting]["overdue"]
        assert not listed[acknowledged]["overdue"]
        rows = {
            line.split()[0]: line.split()
            for line in entraide(ar, "list", "--all").stdout.splitlines()[1:]
        }
        for request_id in mine:
            item = listed[request_id]
            assert rows[request_id][3] == item["status"]
            assert (rows[request_id][-1] == "OVERDUE") == item["overdue"]
        overdue = json.loads(entraide(ar, "list", "--overdue", "--all", "--json").stdout)
        assert [item["id"] for item in overdue] == list(api_items(ar, overdue=True))
        assert waiting in {item["id"] for item in overdue}
        assert acknowledged not in {item["id"] for item in overdue}
        others = json.loads(entraide(ar, "list", "--not-overdue", "--all", "--json").stdout)
        assert acknowledged in {item["id"] for item in others}
        assert waiting not in {item["id"] for item in others}
        shown = entraide(ar, "show", waiting).stdout
        due = listed[waiting]["due_at"]
        assert f"due         {due[:10]} {due[11:16]} UTC, OVERDUE" in shown
    finally:
        ar.clock.now = None


def test_names_a_peer_chose_are_printed_as_they_read(ar: Harness) -> None:
    """A peer may name an attachment with a bidirectional override (`evil\u202etxt.exe`
    reads `evilexe.txt`) or a C1 control (U+009B opens an escape sequence on some terminals);
    the protocol allows both (protocol.md §6.2): each is printed as `?`."""
    names = ["evil\u202etxt.exe", "[red]report\x9b31m.pdf"]
    request_id = ar.receive_request(
        attachments=[Attachment(name, "text/plain", b"x" * 1500) for name in names],
        urgency={"level": "routine"},
    )
    shown = entraide(ar, "show", request_id).stdout
    assert "1. evil?txt.exe  text/plain  1.5 KiB (1500 bytes)" in shown
    assert "2. [red]report?31m.pdf  text/plain" in shown  # markup printed, not obeyed
    assert "\u202e" not in shown
    assert "\x9b" not in shown
    # --json: the names as the API gives them, escaped to ASCII for a terminal.
    raw = entraide(ar, "show", request_id, "--json").stdout
    assert raw.isascii()
    attachments = json.loads(raw)["messages"][0]["attachments"]
    assert [item["name"] for item in attachments] == names


def test_a_download_writes_and_prints_a_peers_names_as_they_read(
    ar: Harness, tmp_path: Path
) -> None:
    """From review: `download` wrote and printed a peer's names raw. `invoice\u202efdp.exe`
    (a right-to-left override, which the protocol lets a peer send) was a file every file
    manager shows as `invoiceexe.pdf`, printed so in the `sha256sum` lines, the progress bar
    and the "already in" refusal; and the bar read names as markup (`Report [final].pdf`
    showed as `Report .pdf`). Such characters become `_` in the name written, and each line
    names the file as written, so `sha256sum -c` still checks them."""
    names = ["Report [final].pdf", "invoice\u202efdp.exe", "a\x85b\u2028c.txt"]
    contents = [f"evidence {number}".encode() for number in range(len(names))]
    request_id = ar.receive_request(
        attachments=[
            Attachment(name, "application/pdf", data)
            for name, data in zip(names, contents, strict=True)
        ],
        urgency={"level": "routine"},
    )
    out = tmp_path / "got"
    done = entraide(ar, "download", request_id, "--out", str(out))
    written = ["Report [final].pdf", "invoice_fdp.exe", "a_b_c.txt"]
    assert sorted(path.name for path in out.iterdir()) == sorted(written)
    lines = done.stdout.splitlines()
    assert lines[-3:] == [
        f"{hashlib.sha256(data).hexdigest()}  {name}"
        for data, name in zip(contents, written, strict=True)
    ]
    for line in lines[-3:]:  # as `sha256sum -c` reads them in the folder
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert "Report [final].pdf" in done.stderr  # the progress bar: printed, not markup
    for shown in (done.stdout, done.stderr):
        assert not {"\u202e", "\x85", "\u2028"} & set(shown)
    again = run(ar, "download", request_id, "--out", str(out))
    assert again.returncode == 1
    assert again.stderr == (
        f"error: Report [final].pdf, invoice_fdp.exe, a_b_c.txt already in {out}: nothing is "
        "overwritten; download into another --out folder\n"
    )
