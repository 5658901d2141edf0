"""`entraide requests send|download` given what an operator may well give it: a file that is
not there, a request that is not JSON, a node that cannot be reached. Each is one line
saying so and a non-zero exit, never a traceback, and nothing is created at the node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.evidence.cli import file_names
from app.localnodes import free_port


def _entraide(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ENTRAIDE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
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
