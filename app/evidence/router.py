"""Local API for large evidence (role: officer): drafts, resumable uploads, submission.

    POST  /api/v1/evidence/drafts                              declare document + attachments
    POST  /api/v1/requests/{id}/messages/drafts                the same, for a reply
    GET   /api/v1/evidence/drafts/{id}                         progress of each attachment
    GET, PUT /api/v1/evidence/drafts/{id}/document             read or replace its document
    HEAD  /api/v1/evidence/drafts/{id}/attachments/{index}     Upload-Offset: durable offset
    PATCH /api/v1/evidence/drafts/{id}/attachments/{index}     bytes from Upload-Offset on
    POST  /api/v1/evidence/drafts/{id}/submit                  seal and queue
    DELETE /api/v1/evidence/drafts/{id}                        discard an open draft

Upload bodies are streamed (the node's body limit does not apply to the PATCH route: the
declared size does), encrypted chunk by chunk, and never held whole in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Annotated, TypeVar

import anyio
from fastapi import APIRouter, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.audit.log import record_alone
from app.auth.lasting import StillAllowed, TokenWithdrawn
from app.auth.refusals import already_audited, record_refusal
from app.auth.service import Principal
from app.auth.throttle import TooManyRequests
from app.clock import ClockDep
from app.config import body_idle_seconds
from app.crypto.envelope import EnvelopeError
from app.db import unit_of_work
from app.deps import (
    NodeDep,
    OfficerDep,
    SessionDep,
    UnitOfWorkRoute,
    record_token_refused,
    source_address,
)
from app.errors import Conflict, NotFound, PayloadTooLarge
from app.evidence import drafts, schemas
from app.evidence.arrivals import ARRIVALS
from app.evidence.blobstore import DirectoryBlobStore, UploadBusy
from app.evidence.node_store import blob_store
from app.evidence.pump import body_timed_out, feed_in_thread, until_idle
from app.evidence.stream import PartWriter, UploadError
from app.limits import BodyTimedOut
from app.node import Node
from app.plainint import PlainInt
from app.requests import access, idempotency
from app.requests.router import check_dates
from app.requests.schemas import Submitted

log = logging.getLogger(__name__)

# How long `HEAD` waits for a PATCH of the same attachment still under way (one whose client
# has gone keeps what reached the node within a second or two); past it, the offset so far.
RESUME_WAIT_SECONDS = 10.0
router = APIRouter(prefix="/api/v1/evidence", tags=["evidence"], route_class=UnitOfWorkRoute)
# A reply's draft is made on its request, beside POST /api/v1/requests/{id}/messages.
replies = APIRouter(prefix="/api/v1/requests", tags=["evidence"], route_class=UnitOfWorkRoute)

DraftId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
RequestId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
Index = Annotated[PlainInt, Path(ge=1, le=63)]
_writers = drafts.WRITERS
Body = TypeVar("Body", bound=BaseModel)


def _created_once(
    node: Node,
    principal: Principal,
    key: str | None,
    route: str,
    body: BaseModel,
    response: Response,
    create: Callable[[Session], schemas.DraftView],
) -> schemas.DraftView:
    """A draft made once per Idempotency-Key (app/requests/idempotency.py), as submissions
    are: a create repeated after a lost answer gets the draft, not a second one nobody
    knows of. The answer kept under the key is the draft's id alone: its view names the
    attachments, case content the draft keeps sealed, and a kept answer stays in clear for
    days, a discard of the draft notwithstanding (from review). A repeat is answered with
    the draft as it is now, or as any unknown draft once discarded."""
    made: list[schemas.DraftView] = []

    def make(session: Session) -> tuple[int, schemas.DraftCreated]:
        made.append(create(session))
        return 201, schemas.DraftCreated(id=made[-1].id)

    answer = idempotency.answer_once(
        node.sessions, principal, key, idempotency.fingerprint(route, body), make
    )
    if not answer.replayed:
        return made[-1]
    response.headers[idempotency.REPLAYED_HEADER] = "true"
    draft_id = str(answer.body["id"])  # a view kept before 2026-11-30 night has it too
    _check_visible(node, draft_id, principal)
    with unit_of_work(node.sessions) as session:
        draft = drafts.get_draft(session, draft_id, principal)
        return drafts.draft_view(session, node, blob_store(node.settings), draft)


@router.post("/drafts", status_code=201)
def create_draft(
    body: schemas.CreateDraft,
    node: NodeDep,
    principal: OfficerDep,
    response: Response,
    idempotency_key: idempotency.KeyHeader = None,
) -> schemas.DraftView:
    def create(session: Session) -> schemas.DraftView:
        draft = drafts.create_draft(session, node, body=body, principal=principal)
        return drafts.draft_view(session, node, blob_store(node.settings), draft)

    route = "POST /api/v1/evidence/drafts"
    return _created_once(node, principal, idempotency_key, route, body, response, create)


@replies.post("/{request_id}/messages/drafts", status_code=201)
def create_reply_draft(
    request_id: RequestId,
    body: schemas.CreateReplyDraft,
    node: NodeDep,
    principal: OfficerDep,
    clock: ClockDep,
    response: Response,
    idempotency_key: idempotency.KeyHeader = None,
) -> schemas.DraftView:
    """A message of this request with large evidence (a result, say): uploaded and submitted
    on the draft routes below, then sent as `POST .../messages` sends one."""
    access.check_visible(
        node, request_id=request_id, principal=principal, action="evidence.draft_created"
    )

    def create(session: Session) -> schemas.DraftView:
        # Here, as add_message does: a repeat under its key gets the answer it had.
        check_dates(body.document, clock(), node.settings.clock_skew_seconds)
        draft = drafts.create_draft(
            session, node, body=body, principal=principal, request_id=request_id
        )
        return drafts.draft_view(session, node, blob_store(node.settings), draft)

    route = f"POST /api/v1/requests/{request_id}/messages/drafts"
    return _created_once(node, principal, idempotency_key, route, body, response, create)


def _check_visible(node: Node, draft_id: str, principal: Principal) -> None:
    """A submitted draft is a request (same id), and a reply's draft belongs to the request
    it answers: once an administrator restricts that request to other officers, the draft's
    author no longer sees the draft here either (refused as unknown, audited)."""
    with unit_of_work(node.sessions) as session:
        request_id = drafts.request_of(session, draft_id)
    try:
        access.check_visible(
            node, request_id=request_id, principal=principal, action="evidence.draft_read"
        )
    except NotFound as exc:
        # What an id never used gets on these routes: `unknown_request` here would tell
        # the caller that a restricted request has this id.
        raise already_audited(NotFound("no such draft", code="unknown_draft")) from exc


@router.get("/drafts/{draft_id}")
def read_draft(
    draft_id: DraftId, session: SessionDep, node: NodeDep, principal: OfficerDep
) -> schemas.DraftView:
    _check_visible(node, draft_id, principal)
    draft = drafts.get_draft(session, draft_id, principal)
    return drafts.draft_view(session, node, blob_store(node.settings), draft)


@router.get("/drafts/{draft_id}/document")
def read_document(
    draft_id: DraftId, session: SessionDep, node: NodeDep, principal: OfficerDep
) -> schemas.DraftDocument:
    _check_visible(node, draft_id, principal)
    draft = drafts.get_draft(session, draft_id, principal)
    return schemas.DraftDocument(document=drafts.read_document(session, node, draft, principal))


@router.put("/drafts/{draft_id}/document")
def replace_document(
    draft_id: DraftId,
    body: schemas.ReplaceDocument,
    session: SessionDep,
    node: NodeDep,
    principal: OfficerDep,
    clock: ClockDep,
) -> schemas.DraftDocument:
    """An open draft's document replaced, its attachments kept: judged as the route that made
    the draft judges it (a new request's, or a reply's with its dates and its evidence's
    attachments)."""
    _check_visible(node, draft_id, principal)
    draft = drafts.get_draft(session, draft_id, principal, lock=True)
    made = {
        "document": body.document,
        "attachments": drafts.declared_attachments(session, node, draft),
    }
    judged: schemas.CreateDraft | schemas.CreateReplyDraft
    if draft.request_id is None:
        judged = _validated(schemas.CreateDraft, {"to": draft.peer_authority, **made})
    else:
        judged = _validated(schemas.CreateReplyDraft, made)
        check_dates(judged.document, clock(), node.settings.clock_skew_seconds)
    document = drafts.replace_document(session, node, draft, judged, principal)
    return schemas.DraftDocument(document=document)


def _validated(model: type[Body], payload: Mapping[str, object]) -> Body:
    """The 422 the route that made the draft answers for this body, at the same fields."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


def _offset_headers(offset: int, size: int, *, complete: bool = False) -> dict[str, str]:
    # Complete means sealed and stored: an empty attachment is at offset 0 until it is.
    return {
        "upload-offset": str(offset),
        "upload-length": str(size),
        "upload-complete": "?1" if complete else "?0",
    }


async def _offset_mismatch(request: Request, node: Node, offset: int, size: int) -> Response:
    """409 with where to resume: answered, not raised (the headers go with it), and audited
    as every refusal of a token holder is (app/auth/refusals.py)."""
    await record_refusal(request.scope, node, 409, "offset_mismatch")
    return Response(
        status_code=409,
        content=b'{"error":"offset_mismatch","detail":"resume from Upload-Offset"}',
        media_type="application/json",
        headers=_offset_headers(offset, size),
    )


@router.head("/drafts/{draft_id}/attachments/{index}", status_code=204)
async def upload_offset(
    draft_id: DraftId, index: Index, node: NodeDep, principal: OfficerDep
) -> Response:
    await run_in_threadpool(_check_visible, node, draft_id, principal)
    store = blob_store(node.settings)
    where = functools.partial(_where_to_resume, node, store, draft_id, index, principal)
    # First: who may ask, and whether there is anything to wait for.
    _, _, complete = await run_in_threadpool(where)
    if not complete:
        # A client asks as soon as its link broke; the request that broke may still be
        # keeping its whole chunks. Answered once it has: its offset is where to go on from.
        # Polled on the event loop, holding no thread the node's other requests need.
        # A PATCH not yet holding the staging file counts as well (app/evidence/arrivals.py).
        staging = drafts.upload_id(draft_id, index)
        deadline = anyio.current_time() + RESUME_WAIT_SECONDS
        while (
            store.being_written(staging) or ARRIVALS.under_way(staging)
        ) and anyio.current_time() < deadline:
            await anyio.sleep(0.02)
    offset, size, complete = await run_in_threadpool(where)
    return Response(status_code=204, headers=_offset_headers(offset, size, complete=complete))


def _where_to_resume(
    node: Node,
    store: DirectoryBlobStore,
    draft_id: str,
    index: int,
    principal: Principal,
) -> tuple[int, int, bool]:
    """An attachment's durable offset, its size, and whether it is complete."""
    with unit_of_work(node.sessions) as session:
        _, row = drafts.upload_target(
            session, node, store, draft_id=draft_id, index=index, principal=principal
        )
        return drafts.staged_offset(store, row), row.size, drafts.uploaded(store, row)


def _finish(
    node: NodeDep, target: drafts.UploadTarget, writer: PartWriter, principal: OfficerDep
) -> None:
    store = blob_store(node.settings)
    part = writer.finalise(store)
    try:
        with unit_of_work(node.sessions) as session:
            drafts.record_uploaded(session, target=target, part=part, principal=principal)
    except Conflict as exc:
        if exc.code == drafts.UPLOAD_CHANGED:
            raise  # started again by another request, under a header of its own
        _restart(node, target)
        raise
    except Exception:
        # Published but not recorded: the attachment starts again from its first byte
        # (HEAD says 0), and must not do so under the key stream that made this blob.
        _restart(node, target)
        raise


def _restart(node: Node, target: drafts.UploadTarget) -> None:
    """An attachment that starts again from its first byte gets a new stream header: other
    bytes under the old key stream would reuse it (docs/api.md §4.8). Best effort: if the
    database refuses this too, the next request fails the same way and nothing is written."""
    try:
        with unit_of_work(node.sessions) as session:
            drafts.renew_stream_header(session, target)
    except Exception as exc:
        log.warning("could not renew an attachment's stream header (%s)", type(exc).__name__)


@router.patch("/drafts/{draft_id}/attachments/{index}", status_code=204)
async def upload(
    draft_id: DraftId,
    index: Index,
    request: Request,
    node: NodeDep,
    principal: OfficerDep,
    upload_offset: Annotated[PlainInt, Header(ge=0)],
) -> Response:
    def target() -> drafts.UploadTarget:
        _check_visible(node, draft_id, principal)
        with unit_of_work(node.sessions) as session:
            found, _ = drafts.upload_target(
                session,
                node,
                blob_store(node.settings),
                draft_id=draft_id,
                index=index,
                principal=principal,
                start_again=True,
            )
            return found

    found = await run_in_threadpool(target)
    if found.submitted:  # as a second submit or a discard is told (docs/api.md)
        raise Conflict("this draft was submitted: it is a request now", code="draft_submitted")
    if found.complete:
        raise Conflict("this attachment is already complete", code="upload_complete")
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isdigit()
        and upload_offset <= found.size  # past the end: only an offset mismatch (below)
        and int(declared) > found.size - upload_offset
    ):
        raise PayloadTooLarge(f"more bytes than the attachment's declared {found.size}")
    store = blob_store(node.settings)
    try:
        writer = await run_in_threadpool(_writers.take, store, found)
    except UploadBusy as exc:
        raise Conflict(
            "another upload of this attachment is in progress", code="upload_busy"
        ) from exc
    except EnvelopeError as exc:
        if not await run_in_threadpool(_still_current, node, found, None):
            # Not damage: another request started the attachment again since this one read
            # it, and stored chunks under its own header; they stay (from review).
            raise Conflict(
                "this attachment was started again meanwhile; ask HEAD where to resume",
                code=drafts.UPLOAD_CHANGED,
            ) from exc
        # The stored chunks no longer open (the staging file was damaged on disk): they are
        # dropped, and the client starts the attachment again, as after any offset mismatch.
        store.discard_upload(found.upload_id)
        await run_in_threadpool(_restart, node, found)
        try:
            await run_in_threadpool(
                functools.partial(
                    record_alone,
                    node.sessions,
                    actor="node",
                    action="evidence.upload_restarted",
                    outcome=exc.code,
                    request_id=found.request_id or draft_id,
                    msg_id=draft_id,
                    details={"attachment": index, "detail": exc.detail},
                )
            )
        except Exception as failure:  # the client must still be told where to resume
            log.error("could not audit a restarted upload (%s)", type(failure).__name__)
        return await _offset_mismatch(request, node, 0, found.size)
    # Nothing stored yet, and the client sends the first byte: the attachment starts from it
    # under a new header. Not for a request at another offset, refused below: a client's
    # stray resend must not start again an attachment another request is finishing.
    starts = writer.durable_offset == 0 and upload_offset == 0
    fresh = drafts.new_stream_header() if starts else None
    try:
        current = await run_in_threadpool(_still_current, node, found, fresh)
    except BaseException:
        writer.close()
        raise
    if not current:
        # Discarded since this request read its draft, or started again under a new stream
        # header: under the staging file's lock now, nothing is written for what it read
        # (the client asks HEAD again). An empty file goes (this request may have just
        # opened it, after a discard); one holding chunks is another request's progress,
        # made under the header that request put in place since this one read it.
        if fresh is not None:  # removed while still locked: nobody starts in it meanwhile
            store.discard_upload(found.upload_id)
        writer.close()
        raise Conflict(
            "this attachment was discarded or started again meanwhile; ask HEAD where to resume",
            code=drafts.UPLOAD_CHANGED,
        )
    if fresh is not None:
        try:
            writer.start_stream(fresh)
        except BaseException:
            writer.close()
            raise
        found = dataclasses.replace(found, stream_header=fresh)
    keep = True
    try:
        if upload_offset != writer.durable_offset:
            return await _offset_mismatch(request, node, writer.durable_offset, found.size)
        try:
            # Encrypted in a worker thread while the next batch arrives, for as long as the
            # officer's token is valid (app/auth/lasting.py).
            await feed_in_thread(
                until_idle(request.stream(), body_idle_seconds(node.settings)),
                StillAllowed(node, principal).around(writer.write_all),
            )
        except ClientDisconnect:
            await run_in_threadpool(writer.checkpoint)
            raise
        except TokenWithdrawn as stopped:
            # Its whole chunks are kept, as after a break: the draft is its author's still,
            # to resume under a valid token or discard.
            await run_in_threadpool(writer.checkpoint)
            # Answered as any refused token is (401 with WWW-Authenticate, or 429 once its
            # address is blocked), and counted the same (from review).
            retry_after = await run_in_threadpool(
                record_token_refused, request, node, stopped.refused, source_address(request)
            )
            if retry_after is not None:
                raise TooManyRequests(retry_after) from stopped
            raise stopped.refused from stopped
        except BodyTimedOut as stalled:
            # The client may still be there: told, with where to resume (its whole chunks
            # are kept), on record as a silent JSON body is (app/main.py).
            offset = await run_in_threadpool(writer.checkpoint)
            await record_refusal(request.scope, node, 408, "body_timeout")
            return body_timed_out(stalled, _offset_headers(offset, found.size))
        except UploadError as exc:
            # More than declared: the client is sending something else than it announced,
            # so none of this request's bytes are kept (HEAD says where to start again).
            await run_in_threadpool(_refuse_overrun, node, found, writer, upload_offset)
            raise PayloadTooLarge(str(exc), code="too_large") from exc
        if writer.offset == found.size:  # the whole body taken: the part ends here
            keep = False
            await run_in_threadpool(_finish, node, found, writer, principal)
            return Response(
                status_code=204, headers=_offset_headers(found.size, found.size, complete=True)
            )
        offset = await run_in_threadpool(writer.checkpoint)
        return Response(status_code=204, headers=_offset_headers(offset, found.size))
    finally:
        if keep:
            _writers.put_back(found.upload_id, writer)
        else:
            writer.close()


def _still_current(node: Node, found: drafts.UploadTarget, fresh: bytes | None) -> bool:
    """Whether `found` is still what to write (`fresh`: and now under that header)."""
    with unit_of_work(node.sessions) as session:
        if fresh is not None:
            return drafts.start_stream(session, found, fresh)
        return drafts.upload_is_current(session, found)


def _refuse_overrun(node: Node, found: drafts.UploadTarget, writer: PartWriter, start: int) -> None:
    """Keep nothing of a refused request. If it had chunks encrypted and written, they are
    not cut off and written again: other bytes under the same stream state would reuse its
    key stream, and the discarded ciphertext may linger on the disk. The attachment starts
    again from its first byte under a new stream header (a client sending more than it
    declared is sending something else than it announced)."""
    if not writer.stored_past(start):
        writer.rewind(start)
        return
    writer.rewind(0)
    blob_store(node.settings).discard_upload(found.upload_id)
    with unit_of_work(node.sessions) as session:
        drafts.renew_stream_header(session, found)


@router.post("/drafts/{draft_id}/submit", status_code=201)
def submit_draft(
    draft_id: DraftId, session: SessionDep, node: NodeDep, principal: OfficerDep, clock: ClockDep
) -> Submitted:
    _check_visible(node, draft_id, principal)
    case, message = drafts.submit_draft(
        session,
        node,
        blob_store(node.settings),
        draft_id=draft_id,
        principal=principal,
        now=clock(),
    )
    return Submitted(id=case.id, msg_id=message.msg_id, status=case.status, delivery="queued")


@router.delete("/drafts/{draft_id}", status_code=204)
def discard_draft(draft_id: DraftId, node: NodeDep, principal: OfficerDep) -> Response:
    # Its author may give up an open draft of theirs even once its request is restricted to
    # others (a reply's): the discard tells them nothing they did not know, and the draft
    # would otherwise keep its content key and uploads until the idle sweep (from review).
    # A submitted one is a request or a message now: hidden as such.
    with unit_of_work(node.sessions) as session:
        own_open = drafts.is_open_draft_of(session, draft_id, principal)
    if not own_open:
        _check_visible(node, draft_id, principal)
    store = blob_store(node.settings)
    # The staging files stay locked until the rows' removal is committed: no upload can
    # write into a draft that is going, nor find it gone half-way.
    with contextlib.ExitStack() as held:
        with unit_of_work(node.sessions) as session:
            discarded = drafts.discard_draft(
                session, store, held, draft_id=draft_id, principal=principal
            )
        drafts.remove_discarded(store, discarded)
    _writers.forget(discarded.upload_ids)
    return Response(status_code=204)
