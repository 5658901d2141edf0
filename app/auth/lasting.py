"""Calls that last: a client's token checked again while its upload or download goes on.

A token is checked when a call begins. An upload or a download of evidence may last hours
(tens of GiB over a slow link): revoked meanwhile, because it leaked, its call went on to the
end, and a download went on handing the evidence to whoever held it (from review). While
such a call lasts, the client's token is read again every RECHECK_SECONDS, in the worker
thread that already does the call's work; once it is revoked or expired, the call stops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from app.auth.service import Principal, TokenRefused, withdrawn
from app.crypto.encoding import utc_now
from app.db import reading
from app.node import Node

log = logging.getLogger(__name__)

RECHECK_SECONDS = 5.0
FAILED_READ_RETRY_SECONDS = 30.0
T = TypeVar("T")


class TokenWithdrawn(Exception):
    """The client's token was revoked, or expired, while its call lasted."""

    def __init__(self, refused: TokenRefused) -> None:
        super().__init__(refused.detail)
        self.refused = refused


class StillAllowed:
    def __init__(self, node: Node, principal: Principal, every: float | None = None) -> None:
        self.node = node
        self.principal = principal
        self.every = RECHECK_SECONDS if every is None else every
        self._due = time.monotonic() + self.every
        self._failed = False  # a read failed during this call (said once)

    def check(self) -> None:
        """TokenWithdrawn if the token was revoked or expired; reads it at most once per
        period (blocking: call it from a worker thread). A read that fails (a database
        failing over, a pool exhausted) stops nothing: tried again next period. A call of
        hours made thousands of these reads, and one failing cut a download that cannot be
        resumed (from review); its expiry needs no read."""
        if time.monotonic() < self._due:
            return
        expires = self.principal.expires_at
        if expires is not None and expires <= utc_now():
            raise TokenWithdrawn(
                TokenRefused(
                    "token expired", code="expired_token", client_id=self.principal.client_id
                )
            )
        try:
            with reading(self.node.sessions) as session:
                refused = withdrawn(session, self.principal.client_id)
        except (SQLAlchemyError, TimeoutError) as exc:
            # Next try a period from now, not from before this read: one that failed after
            # its timeout made every chunk read again, and log, while the database was out
            # of reach (from review). Said once per call.
            self._due = time.monotonic() + max(self.every, FAILED_READ_RETRY_SECONDS)
            if not self._failed:
                self._failed = True
                log.warning(
                    "could not read again whether a client's token is valid (%s); the call "
                    "goes on, and its token is read again every %g s",
                    type(exc).__name__,
                    max(self.every, FAILED_READ_RETRY_SECONDS),
                )
            return
        self._due = time.monotonic() + self.every
        if refused is not None:
            raise TokenWithdrawn(refused)

    def around(self, sink: Callable[[T], None]) -> Callable[[T], None]:
        """`sink`, the token checked before each batch it takes."""

        def checked(batch: T) -> None:
            self.check()
            sink(batch)

        return checked

    def through(self, chunks: Generator[bytes, None, None]) -> Iterator[bytes]:
        """`chunks`, the token checked before each is handed on (and `chunks` closed, its
        files with it, once stopped)."""
        with contextlib.closing(chunks):
            for chunk in chunks:
                self.check()
                yield chunk
