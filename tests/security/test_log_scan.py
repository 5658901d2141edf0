"""Acceptance 4: no token, passphrase or request content in any log line or error body.

A whole exchange runs between two real nodes whose key files are protected by a marked
passphrase, with marked content (facts, attachment bytes and name, message texts), while
callers also send marked wrong tokens and marked invalid input. Afterwards every line the
node processes logged (at DEBUG), every error body, everything the operator commands wrote
to standard error and every audit entry is searched for every marker and every real token.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from app.db import make_engine
from app.localnodes import LocalNode
from app.models import AuditEntry
from app.obs.logs import JsonFormatter, TextFormatter
from tests.e2e.conftest import EXAMPLE, read_request, wait_delivered, wait_for
from tests.security.conftest import new_node, prepare

RUN = uuid.uuid4().hex[:12]
PASSPHRASE = f"PASSPHRASE-MARK-{RUN}"
FACTS = f"FACTS-MARK-{RUN}"
ATTACHED = f"ATTACHMENT-MARK-{RUN}"
FILE_NAME = f"NAME-MARK-{RUN}.txt"
REPLY = f"REPLY-MARK-{RUN}"
WRONG_TOKEN = f"ent_TOKEN-MARK-{RUN}"
MARKERS = [PASSPHRASE, FACTS, ATTACHED, FILE_NAME, REPLY, WRONG_TOKEN]


class Recorder:
    """Everything a node or an operator showed: error bodies and command output."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def error(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            self.texts.append(response.text)
        return response

    def cli(self, node: LocalNode, *args: str) -> str:
        result = node.cli(*args)
        self.texts.append(result.stderr)
        return result.stdout


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, LocalNode]]:
    base = tmp_path_factory.mktemp("logscan")
    env = {"ENTRAIDE_KEY_PASSPHRASE": PASSPHRASE, "ENTRAIDE_LOG_LEVEL": "DEBUG"}
    es, ar = new_node(base, "ES/MJ", **env), new_node(base, "AR/MPF", **env)
    try:
        prepare([es, ar])
        es.pin(ar)
        ar.pin(es)
        yield es, ar
    finally:
        es.stop()
        ar.stop()


def _journey(es: LocalNode, ar: LocalNode, seen: Recorder) -> str:
    body = json.loads(json.dumps(EXAMPLE))
    body["document"]["summary_of_facts"] = FACTS
    body["attachments"] = [
        {
            "name": FILE_NAME,
            "media_type": "text/plain",
            "content_base64": base64.b64encode(ATTACHED.encode() * 20).decode(),
        }
    ]
    with es.client("officer") as http:
        response = seen.error(http.post("/api/v1/requests", json=body))
    assert response.status_code == 201, response.text
    request_id: str = response.json()["id"]
    wait_delivered(es, request_id)
    received = read_request(ar, request_id)
    assert received["document"]["summary_of_facts"] == FACTS
    with ar.client("officer") as http:
        href = received["messages"][0]["attachments"][0]["href"]
        assert ATTACHED.encode() in seen.error(http.get(href)).content
        for kind in ("acknowledgement", "note"):
            message = {"document": {"type": kind, "text": f"{REPLY} {kind}"}}
            posted = seen.error(http.post(f"/api/v1/requests/{request_id}/messages", json=message))
            assert posted.status_code == 201, posted.text
    wait_for(
        "the replies on ES",
        lambda: len(read_request(es, request_id)["messages"]) == 3,
    )
    return request_id


def _hostile(es: LocalNode, ar: LocalNode, seen: Recorder, request_id: str) -> None:
    """Wrong tokens and invalid input that carry the markers: refused without echoing them."""
    for node in (es, ar):
        for header in (f"Bearer {WRONG_TOKEN}", f"bearer {WRONG_TOKEN}", WRONG_TOKEN):
            seen.error(httpx.get(node.url + "/api/v1/requests", headers={"authorization": header}))
    with es.client("officer") as http:
        bad = json.loads(json.dumps(EXAMPLE))
        bad["document"]["summary_of_facts"] = FACTS
        bad["document"]["persons"][0]["nationalities"] = [FACTS]  # fails its pattern
        bad["document"]["unexpected"] = FACTS  # unknown field
        assert seen.error(http.post("/api/v1/requests", json=bad)).status_code == 422
        raw = '{"document": "' + FACTS + '"'  # malformed JSON
        headers = {"content-type": "application/json"}
        assert seen.error(http.post("/api/v1/requests", content=raw, headers=headers)).status_code
        seen.error(http.get(f"/api/v1/requests?cursor={FACTS}"))
        seen.error(http.get(f"/api/v1/requests?peer={FACTS}&status={REPLY}"))
        text = {"document": {"type": "result", "text": REPLY}}  # not allowed from ES
        seen.error(http.post(f"/api/v1/requests/{request_id}/messages", json=text))
    garbage = {"v": 1, "header": base64.b64encode(FACTS.encode()).decode(), "signature": FACTS}
    garbage["parts"] = [FACTS]  # type: ignore[assignment]
    seen.error(httpx.post(ar.url + "/p2p/v1/envelopes", json=garbage))
    seen.error(httpx.post(ar.url + "/p2p/v1/envelopes", content=FACTS.encode()))


def _audit_entries(node: LocalNode) -> str:
    engine = make_engine(node.database_url)
    try:
        with engine.connect() as connection:
            return "\n".join(row.decode() for row in connection.scalars(select(AuditEntry.entry)))
    finally:
        engine.dispose()


def test_no_secret_or_content_in_logs_errors_or_audit(marked: tuple[LocalNode, LocalNode]) -> None:
    es, ar = marked
    seen = Recorder()
    request_id = _journey(es, ar, seen)
    _hostile(es, ar, seen, request_id)
    seen.cli(es, "clients", "list")
    seen.cli(es, "keys", "show")
    seen.cli(ar, "audit", "verify", "--db")
    assert len(seen.texts) > 10
    for node in (es, ar):
        node.stop()  # flush and close the logs
    tokens = [token for node in (es, ar) for token in node.tokens.values()]
    logs = {node.authority_id: node.log_path.read_text() for node in (es, ar)}
    assert all(len(text.splitlines()) > 5 for text in logs.values())  # they did log
    places = {
        **{f"log of {name}": text for name, text in logs.items()},
        **{f"audit of {node.authority_id}": _audit_entries(node) for node in (es, ar)},
        "error bodies and command output": "\n".join(seen.texts),
    }
    for place, text in places.items():
        for needle in [*MARKERS, *tokens]:
            assert needle not in text, f"{needle[:24]}… found in the {place}"
    # Tokens and the passphrase are nowhere on disk either (only their hashes, or nothing).
    for node in (es, ar):
        for path in node.workdir.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for needle in [PASSPHRASE, WRONG_TOKEN, *tokens]:
                    assert needle.encode() not in data, f"{needle[:24]}… found in {path}"


def test_a_command_that_crashes_shows_no_local_variable() -> None:
    """Typer's pretty tracebacks print each frame's locals unless told not to (the default
    changed between releases): a crash would print the settings, a database URL's password
    with them."""
    from app.cli import app

    assert app.pretty_exceptions_show_locals is False


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_a_logged_exception_shows_its_frames_never_its_text(formatter: logging.Formatter) -> None:
    """uvicorn logs an application's crash itself ("Exception in ASGI application", after
    our handler answered 500), with the exception: its text, and the text of the exception
    it was raised from, may quote what was decrypted. Only types and frames are written."""

    def decode(value: str) -> int:
        return int(value)

    content = "-".join(["SECRET", "SUSPECT", "NAME Martin Rivas"])  # in no source line
    try:
        try:
            decode(content)
        except ValueError as inner:
            raise RuntimeError(f"while reading {content}") from inner
    except RuntimeError:
        record = logging.LogRecord(
            "uvicorn.error",
            logging.ERROR,
            __file__,
            1,
            "Exception in ASGI application",
            None,
            sys.exc_info(),
        )
    line = formatter.format(record)
    assert "SECRET" not in line
    assert "Martin" not in line
    for shown in ("RuntimeError", "ValueError", "in decode", "Exception in ASGI application"):
        assert shown in line


def test_json_log_lines_carry_no_terminal_colour_codes() -> None:
    """uvicorn adds `color_message`, its message with colour codes, to its records (from
    review: JSON lines carried raw escape sequences)."""
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (7,), None
    )
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    line = JsonFormatter().format(record)
    assert "\x1b" not in json.loads(line).get("color_message", "")
    assert json.loads(line)["message"] == "Started server process [7]"
    assert "color_message" not in json.loads(line)
