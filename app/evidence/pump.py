"""Overlapping the network with the crypto while a part streams into the node.

Encrypting or checking a chunk (libsodium, hashlib) and writing it release the GIL, so a
worker thread can process one batch while the event loop receives the next. At most two
batches are held, whatever the size of the part, and no worker thread is left running on a
writer the caller is about to checkpoint or close.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable

import anyio
import anyio.to_thread
from fastapi.responses import JSONResponse

from app.limits import BodyTimedOut

BATCH_BYTES = 1 << 20


async def feed_in_thread(
    chunks: AsyncIterable[bytes],
    sink: Callable[[list[bytes]], None],
    *,
    batch_bytes: int = BATCH_BYTES,
) -> None:
    """Give what `chunks` yields to `sink`, in batches of about `batch_bytes`, in order.

    `sink` runs in a worker thread on one batch while the next batch is received. An
    exception from `sink` stops the receiving and is raised; one from `chunks` (a client
    that disconnects, a body gone silent) is raised once what was received before it has
    been given to `sink` too: the caller keeps its whole chunks, and the client resumes
    after them (dropped, up to a batch of bytes that had reached the node was sent again
    after every broken link). The last batch, shorter than `batch_bytes`, is given before
    this returns.
    """
    failures: list[Exception] = []

    async def run(batch: list[bytes], done: anyio.Event) -> None:
        try:
            await anyio.to_thread.run_sync(sink, batch)
        except Exception as exc:  # handed to the caller below, after the task group
            failures.append(exc)
        finally:
            done.set()

    received: Exception | None = None
    batch: list[bytes] = []
    size = 0
    async with anyio.create_task_group() as tasks:
        idle = anyio.Event()
        idle.set()
        try:
            async for data in chunks:
                if not data:
                    continue
                batch.append(data)
                size += len(data)
                if size >= batch_bytes:
                    await idle.wait()
                    if failures:
                        break
                    idle = anyio.Event()
                    tasks.start_soon(run, batch, idle)
                    batch, size = [], 0
        except Exception as exc:  # raised after the batch in flight, which the caller keeps
            received = exc
    if failures:
        raise failures[0]
    if batch:
        await anyio.to_thread.run_sync(sink, batch)
    if received is not None:
        raise received


async def until_idle(chunks: AsyncIterable[bytes], seconds: float) -> AsyncIterator[bytes]:
    """`chunks`, ended with BodyTimedOut when none arrives for `seconds`. A sender whose
    connection went silent without closing (power lost, a NAT's state dropped) otherwise held
    its part's staging file locked, and every retry refused as busy, until the node restarted:
    the server gives a request's body no deadline of its own (from review). Not a disconnect:
    the client may still be there to read the route's 408 and its offset (from review: it
    got a bare 499, meant for the logs of a client that left)."""
    iterator = aiter(chunks)
    while True:
        with anyio.move_on_after(seconds) as waited:
            try:
                data = await anext(iterator)
            except StopAsyncIteration:
                return
        if waited.cancelled_caught:
            raise BodyTimedOut(f"the body sent nothing for {seconds:g} s")
        yield data


def body_timed_out(stalled: BodyTimedOut, headers: dict[str, str]) -> JSONResponse:
    """The answer to a streamed body that went silent: 408 `body_timeout` as a JSON body's,
    with `headers` saying where to resume, and the connection closed (the rest of the
    declared body would otherwise be awaited before the next request)."""
    return JSONResponse(
        {"error": "body_timeout", "detail": stalled.detail},
        status_code=408,
        headers={**headers, "connection": "close"},
    )
