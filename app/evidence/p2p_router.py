"""P2P routes for envelopes with streamed parts (docs/protocol.md section 8.5).

    POST /p2p/v1/evidence/envelopes                          announce: header, signature, part 0
    HEAD /p2p/v1/evidence/envelopes/{msg_id}/parts/{index}   Upload-Offset: bytes held
    PUT  /p2p/v1/evidence/envelopes/{msg_id}/parts/{index}   the part's ciphertext from an offset

No bearer token, as for `POST /p2p/v1/envelopes`: the announce is signed, and every part byte
is checked against the signed header (its length and hash) and authenticated chunk by chunk.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.audit.log import record, record_alone
from app.config import body_idle_seconds
from app.crypto import envelope as env
from app.db import reading, unit_of_work
from app.deps import PEER_SIGNED, NodeDep, record_p2p_refusal, source_address
from app.errors import EnvelopeRefused
from app.evidence import holders, inbound
from app.evidence.blobstore import DirectoryBlobStore, UploadBusy
from app.evidence.node_store import blob_store
from app.evidence.pump import body_timed_out, feed_in_thread, until_idle
from app.evidence.stream import PartReceiver
from app.limits import BodyTimedOut
from app.openapi import RECEIPT_ANSWER
from app.p2p.refusals import audit_refusals, json_body
from app.p2p.service import Accepted
from app.peers.keys import refresh_peer_keys
from app.plainint import PlainInt

log = logging.getLogger(__name__)
T = TypeVar("T")
router = APIRouter(prefix="/p2p/v1/evidence", tags=["p2p"], dependencies=[Depends(PEER_SIGNED)])

MsgId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
Index = Annotated[PlainInt, Path(ge=1, le=63)]
_receivers = inbound.ReceiverCache()
_holders = holders.PartHolders()
# Checks of a whole part, made once every chunk has opened (app/evidence/stream.py).
WHOLE_PART_CHECKS = frozenset({"part_hash_mismatch", "manifest_mismatch"})


def close_kept_receivers() -> None:
    """At the app's shutdown: each kept receiver holds its staging file open."""
    _receivers.close()


def _kept_after_refusal(receiver: PartReceiver) -> bool:
    if receiver.failed:
        return False
    try:
        receiver.checkpoint()
    except Exception:  # whatever it is, the refusal is still answered and audited
        return False  # the next request rebuilds it from what is on disk
    return True


def _dropping_damaged(node: NodeDep, work: Callable[[], T]) -> T:
    """`work`, and if it finds a transfer's stored announcement damaged, the row dropped (in
    a transaction of its own: `work`'s rolled back) for its sender to announce again."""
    try:
        return work()
    except inbound.TransferDamaged as damaged:
        log.error(
            "inbound transfer %s no longer opens (%s): dropped, for its sender to announce again",
            damaged.msg_id,
            damaged.cause.code,
        )
        with unit_of_work(node.sessions) as session:
            inbound.drop_damaged(session, damaged)
        raise


def _announce_once(node: NodeDep, wire: object) -> inbound.Announced:
    with unit_of_work(node.sessions) as session:
        return inbound.announce(session, node, blob_store(node.settings), wire=wire)


def _announce(node: NodeDep, wire: object) -> inbound.Announced:
    try:
        return _dropping_damaged(node, lambda: _announce_once(node, wire))
    except IntegrityError:
        # Two copies of one announcement raced past the check for a transfer (PostgreSQL,
        # parallel retries): the loser rolled back, and a second look finds the winner's.
        return _dropping_damaged(node, lambda: _announce_once(node, wire))


@router.post(
    "/envelopes",
    status_code=202,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
    # The envelope is held already (a repeat), or has no part left to send: its receipt.
    responses={
        200: {"description": "Held already: its stored receipt", **RECEIPT_ANSWER},
        201: {"description": "Accepted whole: the receipt", **RECEIPT_ANSWER},
    },
)
async def announce(request: Request, node: NodeDep) -> JSONResponse:
    wire = await json_body(request)
    try:
        if wire is None:
            raise EnvelopeRefused("malformed_envelope", "the body is not a JSON object")
        announced = await run_in_threadpool(_announce, node, wire)
    except EnvelopeRefused as refusal:
        source = source_address(request)
        await run_in_threadpool(audit_refusals, node, [(wire, refusal)], source=source)
        raise
    if announced.accepted is not None:
        return JSONResponse(
            announced.accepted.receipt.to_wire(),
            status_code=201 if announced.accepted.created else 200,
        )
    return JSONResponse({"parts": announced.offsets}, status_code=202)


def _target(
    node: NodeDep,
    msg_id: str,
    index: int,
    *,
    open_keys: bool = True,
    put: inbound.SignedPut | None = None,
) -> inbound.PartTarget:
    def find() -> inbound.PartTarget:
        # Where a part stands, which anyone may ask, only reads: on SQLite it then waits for
        # no writer and holds none off. A PUT may write (the peer's first signed part).
        with (unit_of_work if open_keys else reading)(node.sessions) as session:
            return inbound.part_target(
                session,
                node,
                blob_store(node.settings),
                msg_id=msg_id,
                index=index,
                open_keys=open_keys,
                put=put,
            )

    return _dropping_damaged(node, find)


def _signed_target(
    node: NodeDep, msg_id: str, index: int, put: inbound.SignedPut
) -> inbound.PartTarget:
    try:
        return _target(node, msg_id, index, put=put)
    except inbound.BadPartSignature as refused:
        # Perhaps the sender rotated its keys since it sealed the envelope, and signs with
        # its new key: follow its signed rotation (docs/protocol.md §5.4), as for an envelope
        # signed with a key not pinned here, then check once more. At most once per peer
        # refresh interval, whoever sends bad signatures.
        if refresh_peer_keys(node, refused.sender) is None:
            raise
    return _target(node, msg_id, index, put=put)


def _headers(offset: int, length: int) -> dict[str, str]:
    return {"upload-offset": str(offset), "upload-length": str(length)}


@router.head("/envelopes/{msg_id}/parts/{index}", status_code=204)
async def part_offset(msg_id: MsgId, index: Index, request: Request, node: NodeDep) -> Response:
    try:
        # No key is opened to say where to resume: anyone may ask.
        target = await run_in_threadpool(
            functools.partial(_target, node, msg_id, index, open_keys=False)
        )
    except EnvelopeRefused as refused:  # anyone may ask: audited and counted as a PUT is
        await run_in_threadpool(
            _refused_part, node, msg_id, index, refused, source_address(request)
        )
        raise
    return Response(status_code=204, headers=_headers(target.offset, target.length))


def _refused_part(
    node: NodeDep,
    msg_id: str,
    index: int,
    refusal: EnvelopeRefused,
    source: str,
    *,
    sender: str | None = None,
) -> None:
    """Counted against the sending address like any refused envelope (anyone who knows a
    message id can send a part; only a signed one is taken), and audited until that address
    is throttled. `sender`: the envelope's own (signed) sender, for a refusal of the envelope
    itself once its parts are all in; a refused part's bytes are anyone's."""
    with unit_of_work(node.sessions) as session:
        if record_p2p_refusal(session, node, source):
            record(
                session,
                actor=f"peer:{sender or 'unknown'}",
                action="envelope.refused",
                outcome=refusal.code,
                msg_id=msg_id,
                peer=sender,
                details={"code": refusal.code, "detail": refusal.detail, "part": index},
            )


def _completed(
    node: NodeDep, msg_id: str, index: int, receiver: PartReceiver, from_offset: int
) -> Accepted | None:
    store = blob_store(node.settings)
    receiver.finalise(store)

    def count() -> bool:
        with unit_of_work(node.sessions) as session:
            return inbound.part_received(
                session, node, store, msg_id=msg_id, index=index, from_offset=from_offset
            )

    if not _dropping_damaged(node, count):
        return None

    def complete() -> Accepted | None:
        with unit_of_work(node.sessions) as session:
            return inbound.complete_held(session, node, store, msg_id=msg_id)

    return _dropping_damaged(node, complete)


def _restarted(
    node: NodeDep, target: inbound.PartTarget, damage: env.EnvelopeError, offset: int
) -> None:
    """On record: what this node stored of a part no longer opened; it resumes at `offset`."""
    record_alone(
        node.sessions,
        actor="node",
        action="evidence.part_restarted",
        outcome=damage.code,
        msg_id=target.msg_id,
        peer=target.sender or None,
        details={"part": target.index, "detail": damage.detail, "from_offset": offset},
    )


@router.put(
    "/envelopes/{msg_id}/parts/{index}",
    status_code=204,
    responses={201: {"description": "The envelope's last part: its receipt", **RECEIPT_ANSWER}},
)
async def put_part(
    msg_id: MsgId,
    index: Index,
    request: Request,
    node: NodeDep,
    upload_offset: Annotated[PlainInt, Header(ge=0)],
    entraide_part_signature: Annotated[
        str | None,
        Header(
            description="b64 of the sender's signature of this PUT (docs/protocol.md §8.5); "
            "refused without it (`403 bad_part_signature`)"
        ),
    ] = None,
) -> Response:
    try:
        put = inbound.SignedPut(upload_offset, entraide_part_signature)
        target = await run_in_threadpool(_signed_target, node, msg_id, index, put)
        declared = request.headers.get("content-length")
        if (
            not target.done
            and declared is not None
            and upload_offset <= target.length  # past the end: an offset mismatch (below)
            and (not declared.isdigit() or int(declared) > target.length - upload_offset)
        ):
            raise EnvelopeRefused("too_large", "more bytes than the part's length", status_code=413)
    except EnvelopeRefused as refused:
        # No transfer, no such part, not its turn, expired, or too long: audited and counted
        # like any refused part (anyone may send one).
        await run_in_threadpool(
            _refused_part, node, msg_id, index, refused, source_address(request)
        )
        raise
    if target.done:
        return Response(status_code=204, headers=_headers(target.length, target.length))
    store = blob_store(node.settings)
    try:
        receiver = await _take(node, store, target, put)
    except holders.PartCompleted:
        return Response(status_code=204, headers=_headers(target.length, target.length))
    except EnvelopeRefused as refused:  # the part read again after a takeover: as any
        await run_in_threadpool(
            _refused_part, node, msg_id, index, refused, source_address(request)
        )
        raise
    except UploadBusy as exc:
        raise EnvelopeRefused("part_busy", "this part is being received", status_code=409) from exc
    except env.EnvelopeError as exc:
        # What we stored of the part no longer opens (our disk, not the sender's bytes:
        # every chunk was checked before it was stored). Start the part again, and tell the
        # sender where, as for any other offset it does not know: a refusal in its own
        # name would be final, and fail a delivery that the next attempt completes.
        store.discard_upload(inbound.receive_upload_id(msg_id, index))
        await run_in_threadpool(_restarted, node, target, exc, 0)
        return JSONResponse(
            {"error": "offset_mismatch", "detail": "resume from Upload-Offset"},
            status_code=409,
            headers=_headers(0, target.length),
        )
    name = inbound.receive_upload_id(msg_id, index)
    holder = _holders.hold(name, lambda: receiver.durable_offset)
    try:
        return await _receive(request, node, target, upload_offset, receiver, holder)
    finally:
        _holders.let_go(name, holder)


async def _take(
    node: NodeDep, store: DirectoryBlobStore, target: inbound.PartTarget, put: inbound.SignedPut
) -> PartReceiver:
    """The part's receiver; held by a PUT that stored nothing for a while, taken from it by
    a signed PUT at the offset it stands at (app/evidence/holders.py). UploadBusy if held."""
    try:
        return await run_in_threadpool(_receivers.take, store, target)
    except UploadBusy:
        name = inbound.receive_upload_id(target.msg_id, target.index)
        stalled_for = body_idle_seconds(node.settings) * holders.STALLED_IDLE_PERIODS
        holder = _holders.stalled(name, put.offset, stalled_for)
        if put.signature is None or holder is None or not await holders.take_over(holder):
            raise
        # The holder may have completed the part as it was cancelled (a thread's work is not
        # cut short): what the database says now, not what this request read before.
        try:
            now = await run_in_threadpool(
                functools.partial(_target, node, target.msg_id, target.index, open_keys=False)
            )
        except EnvelopeRefused as refused:
            if refused.code != "unknown_transfer":
                raise
            # The holder completed the envelope's last part: the transfer is gone, the
            # envelope accepted. Told the part is done, the sender announces again and gets
            # the stored receipt (a 404 made it wait a retry's backoff; from review).
            raise holders.PartCompleted() from None
        if now.done:
            raise holders.PartCompleted() from None
    receiver = await run_in_threadpool(_receivers.take, store, target)
    await run_in_threadpool(
        functools.partial(
            record_alone,
            node.sessions,
            actor="node",
            action="evidence.part_taken_over",
            outcome="stalled",
            msg_id=target.msg_id,
            peer=target.sender or None,
            details={"part": target.index, "offset": put.offset},
        )
    )
    return receiver


async def _receive(
    request: Request,
    node: NodeDep,
    target: inbound.PartTarget,
    upload_offset: int,
    receiver: PartReceiver,
    holder: holders.Holder,
) -> Response:
    """A PUT's body into the part, from `upload_offset` (its header), once it holds the part."""
    msg_id, index = target.msg_id, target.index
    store = blob_store(node.settings)
    keep = True  # for the sender's next request, unless the part is done or refused
    try:
        if receiver.cut_back is not None:  # cut back to the chunks that still open: on record
            offset, damage = receiver.cut_back
            await run_in_threadpool(_restarted, node, target, damage, offset)
            receiver.cut_back = None  # recorded: not again by the next request it serves
        if upload_offset != receiver.durable_offset:
            return JSONResponse(
                {"error": "offset_mismatch", "detail": "resume from Upload-Offset"},
                status_code=409,
                headers=_headers(receiver.durable_offset, target.length),
            )
        try:
            # Checked and stored in a worker thread while the next batch arrives.
            with holder.scope:
                await feed_in_thread(
                    until_idle(request.stream(), body_idle_seconds(node.settings)),
                    holder.storing(receiver.write_all),
                )
            if holder.scope.cancelled_caught and not receiver.complete:  # taken over
                offset = await run_in_threadpool(receiver.checkpoint)
                return JSONResponse(
                    {
                        "error": "part_busy",
                        "detail": "another PUT of this part, signed by its sender, took it "
                        "over: this one stored no chunk for too long",
                    },
                    status_code=409,
                    headers={**_headers(offset, target.length), "connection": "close"},
                )
        except ClientDisconnect:
            await run_in_threadpool(receiver.checkpoint)
            raise
        except BodyTimedOut as stalled:
            # The sender may still be there: told, with where to resume (its whole chunks are
            # kept), and counted against its address as a silent JSON body is (app/main.py).
            offset = await run_in_threadpool(receiver.checkpoint)
            refusal = EnvelopeRefused("body_timeout", stalled.detail, status_code=408)
            await run_in_threadpool(
                _refused_part, node, msg_id, index, refusal, source_address(request)
            )
            request.app.state.metrics.envelope_refused(refusal.code)
            return body_timed_out(stalled, _headers(offset, target.length))
        except env.EnvelopeError as exc:
            keep = False  # unless known fit to keep, below (a cancellation meanwhile)
            refusal = EnvelopeRefused(exc.code, exc.detail)
            if exc.code in WHOLE_PART_CHECKS:
                # Every chunk opened, yet the whole part is not what the header and manifest
                # say: made so by whoever holds the content key. Start it again.
                store.discard_upload(inbound.receive_upload_id(msg_id, index))
            else:
                # A chunk failed (bytes that do not open, or past the part's end): it was
                # never stored, and the chunks before it are authentic. Kept, so that a bad
                # chunk does not undo the sender's progress; the receiver too, unless the
                # failure left it unusable, and the good chunks of this request made durable
                # as a break's are.
                keep = await run_in_threadpool(_kept_after_refusal, receiver)
            await run_in_threadpool(
                _refused_part, node, msg_id, index, refusal, source_address(request)
            )
            raise refusal from exc
        if not receiver.complete:
            offset = await run_in_threadpool(receiver.checkpoint)
            return Response(status_code=204, headers=_headers(offset, target.length))
        keep = False
        try:
            accepted = await run_in_threadpool(
                _completed, node, msg_id, index, receiver, receiver.opened_at
            )
        except EnvelopeRefused as refusal:  # steps 31 on: content, conversation, lifecycle
            await run_in_threadpool(
                functools.partial(_refused_part, sender=target.sender or None),
                node,
                msg_id,
                index,
                refusal,
                source_address(request),
            )
            raise
    finally:
        if keep:
            _receivers.put_back(target, receiver)
        else:
            receiver.close()
    if accepted is not None:
        return JSONResponse(
            accepted.receipt.to_wire(),
            status_code=201,
            headers=_headers(target.length, target.length),
        )
    return Response(status_code=204, headers=_headers(target.length, target.length))
