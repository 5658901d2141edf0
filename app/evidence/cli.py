"""`entraide requests send|reply|download|discard`: large evidence through a node's local API.

Talks HTTP to the node (ENTRAIDE_URL, ENTRAIDE_TOKEN, or --url/--token), like any authority
system would: a draft is created with the attachments' sizes, each file is uploaded in pieces
(a broken upload resumes where the node's durable offset says, on retry or with --draft), and
the draft is submitted. Downloads are checked against the manifest's SHA-256 while they are
written, and a file is only given its final name once it checks out.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.oneline import one_line

requests_app = typer.Typer(
    no_args_is_help=True,
    help="Requests at a terminal: list, show, send, reply (evidence streamed), download.",
)

PIECE = 8 << 20
READ = 1 << 20
RETRIES = 8

UrlOption = Annotated[str | None, typer.Option(help="node URL (default: $ENTRAIDE_URL)")]
TokenOption = Annotated[str | None, typer.Option(help="API token (default: $ENTRAIDE_TOKEN)")]


# What a node's token is made of: a token copied with a space, a line break or a character
# outside ASCII would be echoed by httpx's error about the header, token and all.
TOKEN = re.compile(r"[!-~]+")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {one_line(message)}", err=True)
    return typer.Exit(code)


# Said after the node's own words: what a person at a terminal does about it.
HINTS = {
    401: "the node did not take the token (ENTRAIDE_TOKEN or --token): mistyped, revoked "
    "or expired",
    403: "this token is not an officer's: ask the node's operator for one",
}


def _refusal(response: httpx.Response) -> str:
    """The node's refusal as one line: its code and detail (docs/api.md §7), the first
    fields a 422 names, and what to do. A body that is not the node's JSON (a proxy's error
    page) is not echoed: only its status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    words = [f"HTTP {response.status_code}"]
    if isinstance(body, dict) and body.get("error"):
        words[0] += f" {body['error']}"
        if body.get("detail"):
            words[0] += f": {body['detail']}"
        fields = body.get("fields")
        if isinstance(fields, list):
            words.extend(_field(item) for item in fields[:3] if isinstance(item, dict))
    else:
        words[0] += f" {response.reason_phrase}"
    if response.status_code in HINTS:
        words.append(HINTS[response.status_code])
    return "; ".join(words)[:600]


def _field(item: dict[str, Any]) -> str:
    loc = [str(part) for part in item.get("loc") or []]
    at = ".".join(loc[1:] if len(loc) > 1 else loc)  # `status`, not `query.status`
    return f"{at}: {item.get('msg', '')}"


def _client(url: str | None, token: str | None) -> httpx.Client:
    url = url or os.environ.get("ENTRAIDE_URL")
    token = token or os.environ.get("ENTRAIDE_TOKEN")
    if not url or not token:
        raise fail("give --url and --token, or set ENTRAIDE_URL and ENTRAIDE_TOKEN", 2)
    if not TOKEN.fullmatch(token):
        raise fail(
            "the token holds a space, a line break or a character outside ASCII, which no "
            "token of a node has: check how it was copied (ENTRAIDE_TOKEN or --token)",
            2,
        )
    try:
        return httpx.Client(
            base_url=url.rstrip("/"),
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0, connect=10.0),
        )
    except httpx.InvalidURL as exc:
        raise fail(f"the node URL is not a URL: {exc}", 2) from exc


def where(http: httpx.Client) -> str:
    # Never a password written into the URL (https://user:secret@host).
    return str(http.base_url.copy_with(username=None, password=None))


@contextmanager
def _reaching(http: httpx.Client) -> Iterator[httpx.Client]:
    """A node that cannot be reached (down, a wrong URL, a broken TLS set-up) is an error
    message, not a traceback; the upload's own retries handle a link that breaks mid-way."""
    try:
        yield http
    except httpx.UnsupportedProtocol as exc:  # `localhost:8600`, as one types it
        raise fail(f"the node URL {where(http)} needs https:// (or http://) in front", 2) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise fail(f"cannot reach the node at {where(http)}: {exc}") from exc
    finally:
        http.close()


def _request_body(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        typer.echo(f"error: cannot read {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"error: {path} is not JSON: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not isinstance(body, dict):
        typer.echo(f"error: {path} must hold a JSON object: {{to, document}}", err=True)
        raise typer.Exit(2)
    return body


def _files(paths: list[Path]) -> list[Path]:
    """Every file to attach, readable, before anything is created at the node."""
    for path in paths:
        if not path.is_file() or not os.access(path, os.R_OK):
            typer.echo(f"error: {path} is not a readable file", err=True)
            raise typer.Exit(2)
    return paths


def _media_type(path: Path) -> str:
    # Lower case, as the protocol spells media types (they are case-insensitive): Python guesses
    # `audio/AMR` and `application/vnd.ms-excel.sheet.macroEnabled.12`, which nodes before
    # this one refused (422).
    return (mimetypes.guess_type(path.name)[0] or "application/octet-stream").lower()


def _check(response: httpx.Response, *expected: int) -> Any:
    """The node's answer, or its refusal as one line (a proxy's error page echoed whole was
    a dozen lines of HTML; from review)."""
    if response.status_code not in expected:
        raise fail(_refusal(response))
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:  # a proxy's page answered 200, a URL that is not a node's
        request = response.request
        raise fail(
            f"the answer to {request.method} {request.url.path} is not a node's (not JSON): "
            "is the URL an Entraide node's?"
        ) from exc


def _progress() -> Progress:
    # On stderr, as every other message: stdout carries only the result (the request id,
    # the checked files), for scripts to read; the bar's last refresh left a blank line there.
    # Descriptions are file names, a peer's among them: printed, never read as Rich markup
    # (`Report [final].pdf` showed as `Report .pdf`; from review).
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _pieces(path: Path, offset: int, progress: Progress, task: Any) -> Any:
    with path.open("rb") as source:
        source.seek(offset)
        sent = 0
        while sent < PIECE and (data := source.read(min(READ, PIECE - sent))):
            sent += len(data)
            progress.advance(task, len(data))
            yield data


# Refusals of a PATCH that say only "ask HEAD where to resume" (docs/api.md §4.8): another
# request of the attachment was under way (the one a broken link left, still keeping its
# chunks, or another client's), the node's offset moved meanwhile, or the body went silent.
RESUME_REFUSALS = frozenset({"offset_mismatch", "upload_busy", "upload_changed", "body_timeout"})


# Answers that say "not now" rather than "no": a reverse proxy whose node is restarting
# (502, 504), the node's evidence storage or database out of reach for a moment (503), too
# many calls from this address (429). The upload waits, as long as the answer's Retry-After
# asks (within NOT_NOW_LONGEST) or its own back-off, and asks HEAD again: the node keeps every
# chunk it stored. `507` (the node's storage full) waits for its operator: the command ends
# saying how to resume. (Before: a 20 GiB upload ended at the first 503 of a node restarting
# behind its proxy, and a HEAD answered 502 was read as offset 0.)
NOT_NOW = frozenset({429, 502, 503, 504})
NOT_NOW_LONGEST = 60.0


class _AskAgain(Exception):
    """A PATCH refused with one of RESUME_REFUSALS, or an answer of NOT_NOW: tried again
    from HEAD's answer, after `wait` seconds at least."""

    def __init__(self, message: str, wait: float = 0.0) -> None:
        super().__init__(message)
        self.wait = wait


def _ask_again(response: httpx.Response) -> _AskAgain | None:
    if response.status_code in NOT_NOW:
        return _AskAgain(_refusal(response), _retry_after(response))
    if response.status_code not in (408, 409):
        return None
    try:
        code = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return _AskAgain(_refusal(response)) if code in RESUME_REFUSALS else None


def _retry_after(response: httpx.Response) -> float:
    """The seconds an answer's Retry-After asks for (RFC 9110 §10.2.3: an HTTP date is taken
    as no advice), at most NOT_NOW_LONGEST."""
    value = response.headers.get("retry-after", "").strip()
    return min(float(value), NOT_NOW_LONGEST) if value.isdigit() else 0.0


def _upload(http: httpx.Client, href: str, path: Path, progress: Progress) -> None:
    size = path.stat().st_size
    task = progress.add_task(path.name, total=size)
    failures = 0
    while True:
        try:
            head = http.head(href)
            if again := _ask_again(head):
                raise again
            _check(head, 204)
            offset = int(head.headers.get("upload-offset", "0"))
            progress.update(task, completed=offset)
            if head.headers.get("upload-complete") == "?1":
                return
            length = min(PIECE, size - offset)
            response = http.patch(
                href,
                content=_pieces(path, offset, progress, task),
                headers={"upload-offset": str(offset), "content-length": str(length)},
            )
            if again := _ask_again(response):
                raise again
            _check(response, 204)
            failures = 0
        except (httpx.HTTPError, _AskAgain) as exc:
            failures += 1
            if failures > RETRIES:
                typer.echo(f"error: upload of {path} keeps failing: {one_line(str(exc))}", err=True)
                raise typer.Exit(1) from exc
            wait = max(min(30.0, 0.5 * 2**failures), getattr(exc, "wait", 0.0))
            progress.console.print(
                f"{path.name}: {one_line(str(exc))}; trying again in {wait:g} s",
                markup=False,
                highlight=False,
                soft_wrap=True,  # one line, as a log keeps it
            )
            time.sleep(wait)


def _version(path: Path) -> tuple[int, int, int]:
    """What changes when a file is written: its size, modification time and inode."""
    found = path.stat()
    return found.st_size, found.st_mtime_ns, found.st_ino


def _refuse_inline(path: Path, body: dict[str, Any]) -> None:
    inline = body.get("attachments")
    if inline:
        # Sent as given, they would be dropped without a word (the letter of request in the
        # project's own example, say): each is to be a file of its own.
        names = ", ".join(
            str(item.get("name")) if isinstance(item, dict) else "?"
            for item in (inline if isinstance(inline, list) else [inline])
        )
        typer.echo(
            f"error: {path} holds attachments inline ({names}); this command sends only "
            "files given with --attach: save each to a file and attach it",
            err=True,
        )
        raise typer.Exit(2)


def _declared(files: list[Path]) -> list[dict[str, Any]]:
    return [
        {"name": path.name, "media_type": _media_type(path), "size": path.stat().st_size}
        for path in files
    ]


def _send_draft(
    http: httpx.Client,
    body: dict[str, Any],
    files: list[Path],
    draft: str | None,
    *,
    submitted_already: str,
    request_id: str | None = None,
) -> dict[str, Any]:
    """Create the draft (a new request's, or with `request_id` a reply's), or find the one to
    resume; upload each file (resumable), submit. Returns the node's answer to the submission."""
    if draft is None:
        body["attachments"] = _declared(files)
        route = (
            "/api/v1/evidence/drafts"
            if request_id is None
            else f"/api/v1/requests/{request_id}/messages/drafts"
        )
        created = _check(http.post(route, json=body), 201)
        typer.echo(f"draft {created['id']}", err=True)
    else:
        created = _check(http.get(f"/api/v1/evidence/drafts/{draft}"), 200)
        answered = created.get("request_id")
        if answered != request_id:
            resume = (
                f"it opens a new request: resume it with `entraide requests send FILE --draft "
                f"{draft}`"
                if answered is None
                else f"it answers request {answered}: resume it with `entraide requests reply "
                f"{answered} FILE --draft {draft}`"
            )
            typer.echo(f"error: draft {draft} is not this command's: {resume}", err=True)
            raise typer.Exit(2)
        if created.get("state") == "submitted":
            # Neither resumed nor discarded: it was sent.
            typer.echo(f"error: draft {draft} was already submitted: {submitted_already}", err=True)
            raise typer.Exit(1)
    if len(created["attachments"]) != len(files):
        typer.echo("error: give the same files, in the same order, as the draft's", err=True)
        raise typer.Exit(2)
    try:
        # As each file was before its upload: one rewritten in place meanwhile (same size)
        # was sent as a mix of both, every later hash check passing (from review).
        before = [_version(path) for path in files]
        with _progress() as progress:
            for item, path in zip(created["attachments"], files, strict=True):
                if path.stat().st_size != item["size"]:
                    typer.echo(f"error: {path} is not the size the draft declared", err=True)
                    raise typer.Exit(2)
                _upload(http, item["href"], path, progress)
        for path, version in zip(files, before, strict=True):
            if _version(path) != version:
                typer.echo(
                    f"error: {path} changed while it was uploaded: not submitted; give the "
                    f"draft up (entraide requests discard {created['id']}) and send the file "
                    "again once it no longer changes",
                    err=True,
                )
                raise typer.Exit(1)
        if draft is not None:
            _check_resumed(http, draft, files)
        submitted: dict[str, Any] = _check(
            http.post(f"/api/v1/evidence/drafts/{created['id']}/submit"), 201
        )
    except (typer.Exit, httpx.HTTPError, KeyboardInterrupt, OSError) as exc:
        # Only then is there a draft to resume or give up: a submitted one was sent (and a
        # submission whose answer was lost may have been).
        if isinstance(exc, OSError):
            typer.echo(f"error: cannot read an attached file: {exc}", err=True)
        typer.echo(
            f"the draft may still be open: resume with --draft {created['id']} (its uploads "
            f"are kept; a document refused at submission can be replaced first: entraide "
            f"requests edit-draft {created['id']} FILE), or give it up: entraide requests "
            f"discard {created['id']}",
            err=True,
        )
        if isinstance(exc, OSError):
            raise typer.Exit(1) from exc
        raise
    return submitted


def _check_resumed(http: httpx.Client, draft: str, files: list[Path]) -> None:
    """A resumed draft's uploads began in an earlier run: a file changed between the runs
    (in its uploaded part or after it) would go as a mix of both versions, the node hashing
    what it received. Each file's SHA-256 is compared with the one the node computed, before
    anything is submitted (the check within one run, `_version`, cannot see it)."""
    view = _check(http.get(f"/api/v1/evidence/drafts/{draft}"), 200)
    with _progress() as progress:
        for item, path in zip(view["attachments"], files, strict=True):
            if item.get("sha256") != _file_sha256(path, progress):
                typer.echo(
                    f"error: {path} is not the file whose upload this draft holds (it changed "
                    f"since that upload began): not submitted; give the draft up (entraide "
                    f"requests discard {draft}) and send the file again",
                    err=True,
                )
                raise typer.Exit(1)


@requests_app.command("send")
def send(
    request: Annotated[
        Path, typer.Argument(help="JSON file: {to, document} as for POST /api/v1/requests")
    ],
    attach: Annotated[list[Path] | None, typer.Option("--attach", help="a file to attach")] = None,
    draft: Annotated[str | None, typer.Option(help="continue this draft's uploads")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Create a draft, upload each attached file (resumable), then submit the request."""
    files = _files(attach or [])
    body = _request_body(request) if draft is None else {}
    _refuse_inline(request, body)
    with _reaching(_client(url, token)) as http:
        submitted = _send_draft(
            http,
            body,
            files,
            draft,
            # A new request's id is its draft's.
            submitted_already=f"it is request {draft} (see it with GET /api/v1/requests/"
            f"{draft}, or entraide requests download {draft}); nothing was sent again",
        )
    typer.echo(submitted["id"])


def _file_sha256(path: Path, progress: Progress) -> str:
    digest = hashlib.sha256()
    task = progress.add_task(f"checking {path.name}", total=path.stat().st_size)
    with path.open("rb") as source:
        while data := source.read(READ):
            digest.update(data)
            progress.advance(task, len(data))
    return digest.hexdigest()


def _check_attested(document: Any, files: list[Path]) -> None:
    """Evidence that names an attached file must attest its SHA-256: checked here, before a
    byte is uploaded (the node checks it again at submission, when a mistake would cost
    the whole upload)."""
    evidence = document.get("evidence") if isinstance(document, dict) else None
    named = [
        (number, item)
        for number, item in enumerate(evidence if isinstance(evidence, list) else [])
        if isinstance(item, dict) and isinstance(item.get("attachment"), int)
    ]
    hashes: dict[int, str] = {}
    with _progress() as progress:
        for _, item in named:
            index = item["attachment"]
            if 1 <= index <= len(files) and index not in hashes:
                hashes[index] = _file_sha256(files[index - 1], progress)
    for number, item in named:
        index = item["attachment"]
        if index in hashes and str(item.get("sha256", "")).lower() != hashes[index]:
            typer.echo(
                f"error: document.evidence[{number}] attests a SHA-256 that is not that of "
                f"{files[index - 1]} (attachment {index}): {hashes[index]}",
                err=True,
            )
            raise typer.Exit(2)


@requests_app.command("reply")
def reply(
    request_id: Annotated[str, typer.Argument(help="the request to answer")],
    message: Annotated[
        Path,
        typer.Argument(
            help="JSON file: {document} as for POST /api/v1/requests/{id}/messages "
            "(a result's evidence names its file by --attach order: attachment 1, 2, ...)"
        ),
    ],
    attach: Annotated[list[Path] | None, typer.Option("--attach", help="a file to attach")] = None,
    draft: Annotated[str | None, typer.Option(help="continue this draft's uploads")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Send a message of a request (a result with its evidence, say), its files streamed
    and resumable as `send`'s. Prints the message's id."""
    files = _files(attach or [])
    body: dict[str, Any] = {}
    if draft is None:
        given = _request_body(message)
        _refuse_inline(message, given)
        _check_attested(given.get("document"), files)
        body = {"document": given.get("document")}
    with _reaching(_client(url, token)) as http:
        submitted = _send_draft(
            http,
            body,
            files,
            draft,
            submitted_already=f"it is message {draft} of request {request_id} (see it with "
            f"GET /api/v1/requests/{request_id}); nothing was sent again",
            request_id=request_id,
        )
    typer.echo(submitted["msg_id"])


@requests_app.command("discard")
def discard(
    draft: Annotated[str, typer.Argument(help="the draft's id, as `send` printed it")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Discard an open draft that will not be sent: its uploads are removed at the node."""
    with _reaching(_client(url, token)) as http:
        _check(http.delete(f"/api/v1/evidence/drafts/{draft}"), 204)
    typer.echo(f"draft {draft} discarded")


@requests_app.command("edit-draft")
def edit_draft(
    draft: Annotated[str, typer.Argument(help="the open draft's id, as `send` printed it")],
    document: Annotated[
        Path,
        typer.Argument(
            help="JSON file holding the new document, as the one `send` or `reply` took"
        ),
    ],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Replace an open draft's document (a hash attested wrongly, a date passed), its uploads
    kept; then finish it with `send` or `reply` and `--draft`."""
    body = _request_body(document)
    _refuse_inline(document, body)
    with _reaching(_client(url, token)) as http:
        path = f"/api/v1/evidence/drafts/{draft}/document"
        _check(http.put(path, json={"document": body.get("document")}), 200)
    typer.echo(f"draft {draft}: document replaced")


@requests_app.command("download")
def download(
    request_id: Annotated[str, typer.Argument(help="the request's id")],
    out: Annotated[Path, typer.Option(help="directory to write into")] = Path("."),
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download every attachment of a request, each checked against the manifest's SHA-256."""
    with _reaching(_client(url, token)) as http:
        detail = _check(http.get(f"/api/v1/requests/{request_id}"), 200)
        entries = [entry for message in detail["messages"] for entry in message["attachments"]]
        if not entries:
            typer.echo(f"request {request_id} has no attachment: nothing was written", err=True)
            return
        names = file_names([entry["name"] for entry in entries])
        try:
            # Only now: a mistyped id or a refused token left an empty folder behind.
            out.mkdir(parents=True, exist_ok=True)
            taken = [name for name in names if (out / name).exists() or (out / name).is_symlink()]
        except OSError as exc:
            typer.echo(f"error: cannot write into {out}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from exc
        if taken:
            raise fail(
                f"{', '.join(taken)} already in {out}: nothing is overwritten; "
                "download into another --out folder"
            )
        # Partial files in a folder of their own, made for this run: named `.NAME.partial`
        # beside the others, a peer's attachment of that name was deleted when the file it
        # shadows was downloaded (and so was a user's own file of that name; from review).
        try:
            staging = Path(tempfile.mkdtemp(prefix=".entraide-download-", dir=out))
        except OSError as exc:
            typer.echo(f"error: cannot write into {out}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from exc
        kept = False
        try:
            with _progress() as progress:
                for number, (entry, name) in enumerate(zip(entries, names, strict=True)):
                    _download(http, entry, out / name, staging / f"{number}.partial", progress)
        except _CheckedFileKept:
            kept = True  # its folder stays: the message names the file in it
            raise typer.Exit(1) from None
        finally:
            if not kept:
                shutil.rmtree(staging, ignore_errors=True)
    # As `sha256sum` prints them: `sha256sum -c` in the folder checks the files again, so
    # each line names the file as written (`file_names`: nothing there to replace).
    for entry, name in zip(entries, names, strict=True):
        typer.echo(f"{one_line(str(entry['sha256']))}  {one_line(name)}")


# Linux and most file systems take names of at most 255 bytes; names are kept 9 bytes short
# of it (room for `.{name}.partial` when partial files lay beside them; kept, so names stay).
NAME_MAX = 255
PARTIAL = len(b"..partial")


def file_names(names: list[str]) -> list[str]:
    """Where each attachment goes in the folder: its own name, never a path (a peer chooses
    it), one file each (two attachments of one name, a reply's and a request's say, are
    both kept: `evidence (2).bin`, a name no attachment has), and a name that is no file name
    (`..`) by its place. A name too long for the file system (255 bytes, its partial file's
    included) is shortened on a character boundary, its extension kept when it fits, and
    never to a name another attachment has.

    Control, line-breaking and bidirectional formatting characters, which the protocol lets a
    peer put in a name, become `_`: `invoice\u202efdp.exe` written as is shows as
    `invoiceexe.pdf` in every file manager and listing, an executable passed off as a
    document (from review). `_`, not `?`: a glob character, refused by FAT and NTFS."""
    limit = NAME_MAX - PARTIAL
    bases, own = [], []
    for number, name in enumerate(names, start=1):
        base = Path(name).name
        base = base if base not in {"", ".", ".."} else f"attachment-{number}"
        written = one_line(_encodable(base), "_")
        bases.append(written)
        own.append(written == base)
    # Every attachment's own name (one that fits) is its own first: no copy, shortened or
    # replaced name takes one of them (`a\u202eb` is not `a_b`, another attachment's name).
    taken = {base for base, mine in zip(bases, own, strict=True) if mine and _length(base) <= limit}
    chosen: list[str] = []
    seen: set[str] = set()
    for base, mine in zip(bases, own, strict=True):
        if mine and base not in seen and _length(base) <= limit:
            seen.add(base)
            chosen.append(base)
            continue
        stem, extension = _split(base, limit)
        candidate = _shorten(stem, extension, limit)
        copy = 2
        while candidate in taken or candidate in seen:
            candidate = _shorten(stem, f" ({copy}){extension}", limit)
            copy += 1
        taken.add(candidate)
        seen.add(candidate)
        chosen.append(candidate)
    return chosen


def _encodable(name: str) -> str:
    """A lone surrogate (JSON can spell one) cannot be a file name: it becomes `?`."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return name.encode("utf-8", "replace").decode("utf-8")
    return name


def _length(name: str) -> int:
    return len(os.fsencode(name))


def _split(base: str, limit: int) -> tuple[str, str]:
    """`evidence` and `.tar.gz`: a copy's number goes between them. An extension that
    would leave the stem less than half the room is none (the name is cut at its end)."""
    if base.startswith("."):
        return base, ""
    stem, dot, suffix = base.partition(".")
    extension = dot + suffix
    if _length(extension) > limit // 2:
        return base, ""
    return stem, extension


def _shorten(stem: str, tail: str, limit: int) -> str:
    """`stem` cut, on a character boundary, so that `stem + tail` fits in `limit` bytes."""
    room = limit - _length(tail)
    stem = stem[:room]  # a character takes a byte at least
    while _length(stem) > room:
        stem = stem[:-1]
    return stem + tail


def _download(
    http: httpx.Client, entry: dict[str, Any], target: Path, partial: Path, progress: Progress
) -> None:
    name = target.name
    task = progress.add_task(name, total=entry["size"])
    digest = hashlib.sha256()
    try:
        with http.stream("GET", entry["href"]) as response:
            if response.status_code != 200:
                response.read()
                _check(response, 200)
            if response.headers.get("x-entraide-sha256") != entry["sha256"]:
                raise fail(f"{name}: the node reports another SHA-256")
            # Decrypted evidence: readable by this user only, as the node's own files are.
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as sink:
                for data in response.iter_bytes(READ):
                    digest.update(data)
                    sink.write(data)
                    progress.advance(task, len(data))
    except httpx.HTTPError as exc:
        partial.unlink(missing_ok=True)
        raise fail(f"{name}: the download broke off ({exc}); nothing was kept") from exc
    except OSError as exc:  # a full disk, a folder one may not write in
        with suppress(OSError):
            partial.unlink(missing_ok=True)
        raise fail(
            f"{name}: cannot be written in {target.parent} ({exc.strerror or exc}); "
            "nothing was kept"
        ) from exc
    if digest.hexdigest() != entry["sha256"]:
        partial.unlink(missing_ok=True)
        raise fail(f"{name}: SHA-256 differs from the manifest; nothing was kept")
    _publish(partial, target)


class _CheckedFileKept(Exception):
    """A downloaded and checked file could not take its name: kept where it is."""


def _publish(partial: Path, target: Path) -> None:
    """The checked file under its name, never over a file that appeared meanwhile: a hard
    link fails if the name is taken. On a file system without hard links (FAT, some network
    shares) a rename after a last look instead. A failure keeps the checked partial file."""
    try:
        os.link(partial, target)
    except FileExistsError:
        typer.echo(f"error: {target} appeared meanwhile; it was not overwritten", err=True)
        partial.unlink(missing_ok=True)
        raise typer.Exit(1) from None
    except OSError:
        if target.exists() or target.is_symlink():
            typer.echo(f"error: {target} appeared meanwhile; it was not overwritten", err=True)
            partial.unlink(missing_ok=True)
            raise typer.Exit(1) from None
        try:
            partial.rename(target)
        except OSError as exc:
            typer.echo(
                f"error: {target} could not be written ({exc.strerror}); the checked file "
                f"is kept as {partial}",
                err=True,
            )
            # Not an Exit: the run's staging folder, which holds it, must stay (it was
            # removed, the file with it, from review).
            raise _CheckedFileKept from None
        return
    partial.unlink(missing_ok=True)
