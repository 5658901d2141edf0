"""`entraide requests send|download` given what an operator may well give it: a file that is
not there, a request that is not JSON, a node that cannot be reached. Each is one line
saying so and a non-zero exit, never a traceback, and nothing is created at the node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from app.evidence.cli import file_names
from app.localnodes import free_port


def _entraide(*args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ENTRAIDE_URL": url or f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "ENTRAIDE_TOKEN": "not-a-real-token",
    }
    return subprocess.run(
        [sys.executable, "-m", "app", "requests", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing attachment", "is not a readable file"),
        ("missing request", "cannot read"),
        ("request not JSON", "is not JSON"),
        ("request not an object", "must hold a JSON object"),
        ("node unreachable", "cannot reach the node at http://127.0.0.1:"),
        # Sent as given, the project's own example lost its letter of request without a word.
        ("attachments inline", "holds attachments inline (letter.txt); this command sends"),
    ],
)
def test_send_says_what_is_wrong_in_one_line(tmp_path: Path, case: str, says: str) -> None:
    request = tmp_path / "request.json"
    request.write_text('{"to": "AR/MPF", "document": {}}')
    attachment = tmp_path / "ledger.csv"
    attachment.write_text("a,b\n")
    if case == "missing attachment":
        attachment = tmp_path / "no-such-file.csv"
    elif case == "missing request":
        request = tmp_path / "no-such-request.json"
    elif case == "request not JSON":
        request.write_text("to: AR/MPF")
    elif case == "request not an object":
        request.write_text("[1, 2]")
    elif case == "attachments inline":
        inline = [{"name": "letter.txt", "media_type": "text/plain", "content_base64": "aGk="}]
        request.write_text(json.dumps({"to": "AR/MPF", "document": {}, "attachments": inline}))
    done = _entraide("send", str(request), "--attach", str(attachment))
    assert done.returncode != 0
    assert says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_download_from_an_unreachable_node_says_so(tmp_path: Path) -> None:
    done = _entraide("download", "ab" * 16, "--out", str(tmp_path / "got"))
    assert done.returncode == 1
    assert "cannot reach the node at http://127.0.0.1:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "got").exists()  # no empty folder left for a download that failed


def test_each_attachment_gets_a_file_of_its_own() -> None:
    """A peer names attachments: never a path, never `..`, and two of one name are two
    files (the second one overwrote the first before)."""
    names = ["evidence.tar.gz", "../../etc/evidence.tar.gz", "..", ".bashrc", ".bashrc", "."]
    assert file_names(names) == [
        "evidence.tar.gz",
        "evidence (2).tar.gz",
        "attachment-3",
        ".bashrc",
        ".bashrc (2)",
        "attachment-6",
    ]
    # A copy's name is never another attachment's own.
    assert file_names(["x.tar.gz", "x.tar.gz", "x (2).tar.gz"]) == [
        "x.tar.gz",
        "x (3).tar.gz",
        "x (2).tar.gz",
    ]


@pytest.mark.parametrize(
    "name",
    ["a" * 251 + ".txt", "é" * 128, "€" * 90, "x." + "y" * 253, "." + "z" * 254],
    ids=["255 bytes", "256 bytes of é", "270 bytes of €", "long extension", "dot file"],
)
def test_a_name_too_long_for_the_file_system_is_shortened(name: str) -> None:
    """Linux takes names of 255 bytes at most, and the download is first written as
    `.{name}.partial`: a name the API accepts (255 characters) was ENAMETOOLONG, and one such
    name stopped the download of every attachment of the request."""
    (chosen,) = file_names([name])
    assert len(os.fsencode(f".{chosen}.partial")) <= 255
    assert name.startswith(chosen.removesuffix(".txt"))  # cut on a character boundary
    assert len(os.fsencode(chosen)) > 200  # as much of the name as fits
    if name.endswith(".txt"):
        assert chosen.endswith(".txt")  # its extension kept


def test_shortened_names_are_neither_copies_nor_another_attachments_name() -> None:
    long = "évidence-" + "a" * 300
    fits = file_names([long])[0]
    names = file_names([long + ".pdf", long + ".pdf", long, fits, long + "-other", "short"])
    assert len(set(names)) == len(names)
    assert names[3] == fits  # an attachment's own name is its own
    assert names[5] == "short"
    assert names[0].endswith(".pdf")
    assert names[1].endswith(" (2).pdf")
    for chosen in names:
        assert len(os.fsencode(f".{chosen}.partial")) <= 255
    # A copy's number fits too, however many copies.
    many = file_names(["€" * 90] * 12)
    assert len(set(many)) == 12
    assert many[11].endswith(" (12)")
    assert all(len(os.fsencode(f".{chosen}.partial")) <= 255 for chosen in many)


def test_a_name_no_file_system_can_take_is_written_with_a_question_mark() -> None:
    assert file_names(["\ud800evidence.bin"]) == ["?evidence.bin"]


def test_control_and_bidirectional_characters_are_not_written_in_a_file_name() -> None:
    """From review: a peer's `invoice\u202efdp.exe` was written as is, a file that every
    file manager shows as `invoiceexe.pdf`. Each such character becomes `_`, and a name so
    made takes no other attachment's own name."""
    assert file_names(["invoice\u202efdp.exe", "a\x85b\u2028c\u2066.txt", "\x1b[2Jx"]) == [
        "invoice_fdp.exe",
        "a_b_c_.txt",
        "_[2Jx",
    ]
    assert file_names(["a\u202eb.pdf", "a_b.pdf", "a\u2067b.pdf"]) == [
        "a_b (2).pdf",
        "a_b.pdf",
        "a_b (3).pdf",
    ]


def test_a_guessed_media_type_is_sent_in_lower_case() -> None:
    from app.evidence.cli import _media_type

    assert _media_type(Path("call.amr")) == "audio/amr"
    assert _media_type(Path("ledger.xlsm")) == "application/vnd.ms-excel.sheet.macroenabled.12"
    assert _media_type(Path("no-extension")) == "application/octet-stream"


def test_a_checked_download_is_published_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAT drives and some network shares have no hard links: the checked file is renamed
    into place instead, still never over a file that is there."""
    import errno

    import typer

    from app.evidence import cli

    def no_links(_source: object, _target: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(cli.os, "link", no_links)
    partial, target = tmp_path / ".evidence.bin.partial", tmp_path / "evidence.bin"
    partial.write_bytes(b"checked")
    cli._publish(partial, target)
    assert target.read_bytes() == b"checked"
    assert not partial.exists()
    partial.write_bytes(b"another")
    with pytest.raises(typer.Exit):
        cli._publish(partial, target)
    assert target.read_bytes() == b"checked"  # not overwritten


def test_a_checked_download_that_cannot_take_its_name_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From review: "the checked file is kept as …" named a file in the run's staging folder,
    which was then removed with it (tens of GB downloaded and checked, gone). The caller
    keeps that folder when told so."""
    import errno

    from app.evidence import cli

    def refused(*_args: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli.os, "link", refused)
    monkeypatch.setattr(Path, "rename", refused)
    partial, target = tmp_path / "0.partial", tmp_path / "evidence.bin"
    partial.write_bytes(b"checked")
    with pytest.raises(cli._CheckedFileKept):
        cli._publish(partial, target)
    assert partial.read_bytes() == b"checked"
    assert not target.exists()


def test_a_file_rewritten_while_it_uploads_is_not_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From review: a file rewritten in place (same size) while `requests send` uploaded it
    went as a mix of both, and every hash check after passed (they check what was uploaded).
    The node is a fake at the HTTP edge; the rewrite happens while the node takes the bytes."""
    import typer

    from app.evidence import cli

    evidence = tmp_path / "ledger.bin"
    evidence.write_bytes(b"A" * 1000)
    href = "/api/v1/evidence/drafts/" + "d" * 32 + "/attachments/1"
    state = {"offset": 0, "submitted": False}

    def node(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/api/v1/evidence/drafts":
            item = {"index": 1, "name": "ledger.bin", "size": 1000, "offset": 0}
            created = {"id": "d" * 32, "state": "open", "attachments": [{**item, "href": href}]}
            return httpx.Response(201, json=created)
        if request.method == "HEAD":
            done = {"upload-complete": "?1"} if state["offset"] == 1000 else {}
            return httpx.Response(204, headers={"upload-offset": str(state["offset"]), **done})
        if request.method == "PATCH":
            state["offset"] += len(request.read())
            evidence.write_bytes(b"B" * 1000)  # someone saves over it meanwhile
            return httpx.Response(204, headers={"upload-offset": str(state["offset"])})
        state["submitted"] = True
        return httpx.Response(201, json={"id": "d" * 32})

    body: dict[str, object] = {"to": "AR/MPF", "document": {}}
    with httpx.Client(transport=httpx.MockTransport(node), base_url="http://node") as http:
        with pytest.raises(typer.Exit) as ended:
            cli._send_draft(http, body, [evidence], None, submitted_already="")
    assert ended.value.exit_code == 1
    assert state == {"offset": 1000, "submitted": False}
    assert "changed while it was uploaded: not submitted" in capsys.readouterr().err


NGINX_502 = (
    b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n"
    b"<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx</center>\n</body>\n</html>\n"
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """What may stand between the command and a node: a proxy whose node is down (502, an
    HTML page), a page served 200 at a URL that is no node's, a list page whose cursor holds
    escape sequences (a node gone wrong). A fake at the network edge; the command is real."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/api/v1/requests?"):
                page = {"items": [], "next_cursor": "abc\x1b]0;PWNED\x07\x1b[2J\u202e"}
                self._answer(200, json.dumps(page).encode(), "application/json")
            else:
                self._answer(200, b"<html><body>Welcome</body></html>", "text/html")

        def do_DELETE(self) -> None:
            self._answer(502, NGINX_502, "text/html")

        def _answer(self, status: int, body: bytes, media_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", media_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_proxys_error_page_is_one_line(gateway: str) -> None:
    """From review: `discard` (and every command of this module) echoed a body that is not
    the node's JSON verbatim: an nginx 502 page came out as 8 lines of HTML. Now one line,
    as `requests list` and `show` say a refusal."""
    done = _entraide("discard", "b" * 32, url=gateway)
    assert done.returncode == 1
    assert done.stderr == "error: HTTP 502 Bad Gateway\n"
    assert done.stdout == ""


def test_a_page_that_is_not_a_nodes_answer_is_said_so(gateway: str, tmp_path: Path) -> None:
    done = _entraide("download", "ab" * 16, "--out", str(tmp_path / "got"), url=gateway)
    assert done.returncode == 1
    assert done.stderr == (
        f"error: the answer to GET /api/v1/requests/{'ab' * 16} is not a node's (not JSON): "
        "is the URL an Entraide node's?\n"
    )
    assert not (tmp_path / "got").exists()


def test_the_cursor_list_prints_is_printed_as_it_reads(gateway: str) -> None:
    done = _entraide("list", url=gateway)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        "no request matches\nmore: add --cursor abc?]0;PWNED??[2J? for the next page, or --all\n"
    )
