"""A loopback TCP proxy that breaks connections on purpose, for the delivery fault tests.

It sits between a sender's delivery worker and the receiving node: the sender pins the peer at
the proxy's URL, so every envelope crosses it. The proxy understands just enough HTTP/1.1 to
find where each request ends (the head and a Content-Length body), so it can choose a fault
per request even on a kept-alive connection, and it never parses anything else.

Faults, chosen by a seeded `random.Random` (the sequence of choices is reproducible; which
connection meets which choice depends on timing):

- refuse:   accept the connection and close it at once, before reading anything.
- cut:      forward the head and part of the body, then close both sides.
- delay:    wait a little, then forward normally.
- stall:    forward nothing and hold the connection open for `stall_seconds`, then close.
- drop:     forward the whole request, wait for the receiver's first response bytes (so the
            receiver has done its work), then close without forwarding them: a lost answer.
- hold:     forward the whole request, keep the response until `release()` is called, the
            client gives up, or `max_hold_seconds` pass; released responses are forwarded.
- drip:     forward the whole request, then the response one byte every `drip_seconds`:
            a peer that is slow but never silent for long (it defeats per-read timeouts).

`force(action)` applies one fault to every request, `script(*actions)` to the next few, and
`faults = Faults(...)` sets the probabilities for the rest. Everything runs on an asyncio loop
in one daemon thread; `stop()` cancels every connection and joins the thread, so nothing
outlives the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal

Action = Literal["pass", "refuse", "cut", "delay", "stall", "drop", "hold", "drip"]
FAULTS: tuple[Action, ...] = ("refuse", "cut", "delay", "stall", "drop", "hold", "drip")
MAX_HEAD_BYTES = 64 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Faults:
    """Probability of each fault per request (refuse: per connection). The rest pass."""

    refuse: float = 0.0
    cut: float = 0.0
    delay: float = 0.0
    stall: float = 0.0
    drop: float = 0.0
    hold: float = 0.0
    drip: float = 0.0
    delay_seconds: tuple[float, float] = (0.05, 0.5)
    stall_seconds: float = 3.0
    drip_seconds: float = 1.0

    def __post_init__(self) -> None:
        if sum(self.probability(action) for action in FAULTS) > 1.0:
            raise ValueError("fault probabilities add up to more than 1")

    def probability(self, action: Action) -> float:
        value: float = getattr(self, action)
        return value


NO_FAULTS = Faults()


class _Closed(Exception):
    """The client went away; the connection's handler ends quietly."""


class FaultProxy:
    def __init__(
        self,
        target_port: int,
        *,
        seed: int = 0,
        faults: Faults = NO_FAULTS,
        max_hold_seconds: float = 60.0,
        target_host: str = "127.0.0.1",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.faults = faults
        self.max_hold_seconds = max_hold_seconds
        self.port = 0
        self.stats: Counter[str] = Counter()
        self._forced: Action | None = None
        self._script: deque[Action] = deque()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: list[asyncio.Event] = []
        self._active = 0
        self._startup_error: BaseException | None = None

    # --- control, from the test's thread -----------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._startup_error is not None:
            raise RuntimeError(f"the fault proxy did not start: {self._startup_error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None or not self._thread.is_alive():
            return
        stopping = self._stopping
        assert stopping is not None
        self._loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the fault proxy did not stop in time")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def force(self, action: Action | None) -> None:
        """Apply `action` to every request from now on; None goes back to `faults`."""
        with self._lock:
            self._forced = action

    def script(self, *actions: Action) -> None:
        """Apply these faults, in order, to the next connections and requests, then `faults`.

        A scripted refusal waits for the next new connection; other faults take the next
        request. It makes sure a short random run meets every kind of fault at least once.
        """
        with self._lock:
            self._script.extend(actions)

    def release(self) -> None:
        """Let every response held so far go (to clients that are still there)."""
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            held, self._held = self._held, []
        for event in held:
            loop.call_soon_threadsafe(event.set)

    def count(self, key: str) -> int:
        with self._lock:
            return self.stats[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    def wait_for(self, key: str, at_least: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(key) < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy saw {self.count(key)} {key}, wanted {at_least}")
            time.sleep(0.02)

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); the thread must not die silently
            self._startup_error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    def _bump(self, key: str, by: int = 1) -> None:
        with self._lock:
            self.stats[key] += by

    def _choose(self, *, connection: bool) -> Action:
        with self._lock:
            if self._forced is not None:
                forced = self._forced
                # A refusal is drawn at accept time; a request on a connection opened before
                # the refusal was forced is closed before anything is forwarded.
                if connection:
                    return "refuse" if forced == "refuse" else "pass"
                return forced
            if self._script and (self._script[0] == "refuse") == connection:
                return self._script.popleft()
            draw = self._rng.random()
            if connection:
                return "refuse" if draw < self.faults.refuse else "pass"
            # Refusal was drawn for the connection; a request draws among the other faults.
            edge = 0.0
            for action in FAULTS[1:]:
                edge += self.faults.probability(action)
                if draw < edge:
                    return action
            return "pass"

    def _uniform(self, low: float, high: float) -> float:
        with self._lock:
            return self._rng.uniform(low, high)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._bump("connections")
        self._active += 1
        with self._lock:
            self.stats["max_concurrent"] = max(self.stats["max_concurrent"], self._active)
        try:
            if self._choose(connection=True) == "refuse":
                self._bump("refuse")
                return
            await _Connection(self, reader, writer).serve()
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancels open connections; ending normally keeps asyncio's stream
            # machinery from logging every cancelled handler as an error.
            pass
        except Exception:
            self._bump("proxy_errors")  # a bug in the proxy: tests assert there are none
            raise
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._tasks.discard(task)


class _Connection:
    """One client connection and, once a request passes, its upstream connection."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.upstream_reader: asyncio.StreamReader | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task[None] | None = None
        # What the pump does with the next response bytes: forward, hold or drop.
        self.response_mode: Action = "pass"
        self.response_seen = asyncio.Event()

    async def serve(self) -> None:
        try:
            while True:
                head = await self._read_head()
                if head is None:
                    return
                await self._one_request(head)
        finally:
            if self.pump is not None:
                self.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await self.pump
            if self.upstream_writer is not None:
                self.upstream_writer.close()
                with contextlib.suppress(ConnectionError):
                    await self.upstream_writer.wait_closed()

    async def _read_head(self) -> bytes | None:
        try:
            return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.proxy._bump("partial_heads")
            return None
        except asyncio.LimitOverrunError:
            raise _Closed from None

    async def _one_request(self, head: bytes) -> None:
        proxy = self.proxy
        length = _content_length(head)
        if length is None:
            raise _Closed  # chunked or unparsable: these tests never send such requests
        proxy._bump("requests")
        action = proxy._choose(connection=False)
        if action != "pass":
            proxy._bump(action)
        faults = proxy.faults
        if action == "refuse":
            raise _Closed
        if action == "stall":
            # Read and discard what the client sends until it gives up or the stall ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain_client(), faults.stall_seconds)
            raise _Closed
        if action == "delay":
            await asyncio.sleep(proxy._uniform(*faults.delay_seconds))
        await self._connect_upstream()
        assert self.upstream_writer is not None
        if action == "cut":
            body_part = await self.reader.readexactly(length)
            if length > 1:
                keep = int(proxy._uniform(1, length - 1))
                self.upstream_writer.write(head + body_part[:keep])
            else:
                self.upstream_writer.write(head[: max(1, len(head) // 2)])
            await self.upstream_writer.drain()
            raise _Closed
        self.response_mode = action if action in ("hold", "drop", "drip") else "pass"
        self.response_seen.clear()
        self.upstream_writer.write(head)
        remaining = length
        while remaining:
            chunk = await self.reader.read(min(CHUNK, remaining))
            if not chunk:
                raise _Closed
            remaining -= len(chunk)
            self.upstream_writer.write(chunk)
        await self.upstream_writer.drain()
        proxy._bump("forwarded")
        if action == "drop":
            # Close only once the receiver has answered: it has done the work, the answer is lost.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.response_seen.wait(), proxy.max_hold_seconds)
            raise _Closed

    async def _drain_client(self) -> None:
        while await self.reader.read(CHUNK):
            pass

    async def _connect_upstream(self) -> None:
        if self.upstream_writer is not None and not self.upstream_writer.is_closing():
            return
        proxy = self.proxy
        try:
            reader, writer = await asyncio.open_connection(proxy.target_host, proxy.target_port)
        except OSError:
            proxy._bump("upstream_down")
            raise _Closed from None
        self.upstream_reader, self.upstream_writer = reader, writer
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        """Upstream to client: forward, hold or drop response bytes as the request asked."""
        assert self.upstream_reader is not None
        try:
            while True:
                data = await self.upstream_reader.read(CHUNK)
                if not data:
                    break
                self.response_seen.set()
                if self.response_mode == "drop":
                    continue
                if self.response_mode == "hold":
                    await self._hold(data)
                    continue
                if self.response_mode == "drip":
                    await self._drip(data)
                    continue
                self.writer.write(data)
                await self.writer.drain()
        except ConnectionError:
            pass
        # The receiver closed its side: so do we, as a plain proxy would.
        self.writer.close()

    async def _drip(self, data: bytes) -> None:
        interval = self.proxy.faults.drip_seconds
        deadline = time.monotonic() + self.proxy.max_hold_seconds
        for index in range(len(data)):
            if time.monotonic() > deadline:
                self.proxy._bump("drip_expired")
                raise ConnectionError("drip expired")
            self.writer.write(data[index : index + 1])
            await self.writer.drain()
            self.proxy._bump("dripped_bytes")
            await asyncio.sleep(interval)

    async def _hold(self, first: bytes) -> None:
        proxy = self.proxy
        released = asyncio.Event()
        with proxy._lock:
            proxy._held.append(released)
            proxy.stats["held_now"] += 1
            proxy.stats["held_total"] += 1
        try:
            await asyncio.wait_for(released.wait(), proxy.max_hold_seconds)
        except TimeoutError:
            proxy._bump("hold_expired")
            self.writer.close()
            raise ConnectionError("hold expired") from None
        finally:
            proxy._bump("held_now", -1)
        self.response_mode = "pass"
        proxy._bump("released")
        self.writer.write(first)
        await self.writer.drain()


def _content_length(head: bytes) -> int | None:
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return None
            if length < 0:
                return None
    return length
