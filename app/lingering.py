"""Closing a connection whose request body was not read to its end, without losing the answer.

The node answers some requests before their body is read (a 413 for a declared length over
the limit, a 401 without a token, a 429, a 503 `busy`, a 404 or 405 for a body no route
takes: app/main.py) and closes their connection, since the rest of the body would otherwise
be read to reuse it, and one byte of it cancels uvicorn's keep-alive timer for good. But a
socket closed with unread bytes in it, or with more arriving, answers them with a TCP reset,
and a client still sending its body then loses the answer it had not read yet (httpx raised
`RemoteProtocolError` instead of giving the 413). So such a connection is closed as nginx
does ("lingering close"): the answer is sent, then the end of the stream (where the transport
can: not over TLS), and what the client still sends is read and dropped until it closes its
side (asyncio then closes the transport, as `eof_received` returns nothing) or LINGER_SECONDS
pass. Every other connection is closed at once, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# How long the rest of a body is read and dropped after the answer (nginx: 30 s at most,
# 5 s of silence): bytes still arriving after this get the reset.
LINGER_SECONDS = 10.0


class _LingeringTransport(asyncio.Transport):
    """The connection's transport, whose `close` lingers while a request body is unread."""

    def __init__(self, inner: asyncio.Transport, unread: Callable[[], bool]) -> None:
        super().__init__(extra=None)
        self.inner = inner
        self.unread = unread
        self.lingering: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.lingering is not None or self.inner.is_closing() or not self.unread():
            self.inner.close()
            return
        self.lingering = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.inner.close)
        if self.inner.can_write_eof():
            self.inner.write_eof()  # after the answer: the client reads it, then the end
        self.inner.resume_reading()

    def is_closing(self) -> bool:
        return self.lingering is not None or self.inner.is_closing()

    def stop_lingering(self) -> None:
        if self.lingering is not None:
            self.lingering.cancel()

    def pause_reading(self) -> None:
        if self.lingering is None:  # while lingering, what comes is dropped as it comes
            self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.inner.write(data)

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def abort(self) -> None:
        self.inner.abort()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()


class LingeringH11Protocol(H11Protocol):
    """Uvicorn's h11 protocol, whose connections close with a linger when a request's body
    is left unread (the module's docstring says why)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows the type the same way
        super().connection_made(
            _LingeringTransport(transport, lambda: self.conn.their_state is h11.SEND_BODY)
        )

    def data_received(self, data: bytes) -> None:
        if self._lingering():
            return  # the rest of a body already answered: dropped
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.transport, _LingeringTransport):
            self.transport.stop_lingering()
        super().connection_lost(exc)

    def _lingering(self) -> bool:
        return isinstance(self.transport, _LingeringTransport) and (
            self.transport.lingering is not None
        )
