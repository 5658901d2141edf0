"""Structured logs: one JSON object per line, carrying the request id that caused them.

The request id comes from the caller's `X-Request-Id` when it is well formed, else is made
here. It follows the work: the local API request that queues a message stores it in the outbox
row (`trace_id`), the worker sends it to the peer as `X-Request-Id`, and the peer logs it and
echoes it. Log records hold ids, codes and outcomes, never request content or secrets.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
# Letters, digits and a few separators: enough for UUIDs, W3C trace ids and ULIDs, and
# nothing that could forge a log line or a header.
_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,63}")

_request_id: ContextVar[str | None] = ContextVar("entraide_request_id", default=None)

# LogRecord attributes that are not "extra" fields given by the caller.
# uvicorn's `color_message` repeats the message with a terminal's colour codes: not a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The caller's id if it is well formed, else a fresh one."""
    if value is not None and _WELL_FORMED.fullmatch(value):
        return value
    return new_request_id()


def current_request_id() -> str | None:
    return _request_id.get()


@contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def exception_lines(exc_info: ExcInfo) -> list[str]:
    """An exception for a log: the type and frames of it and of each exception it was raised
    from or during, never their text, which may quote input or decrypted content (a
    validation error's input, a decoded value). Whoever logs it (our handlers, uvicorn's
    "Exception in ASGI application", a library) goes through here."""
    lines: list[str] = []
    seen: set[int] = set()
    exc: BaseException | None = exc_info[1]
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if lines:
            lines.append("raised from or while handling:")
        lines.append(type(exc).__qualname__)
        lines.extend(
            line for frame in traceback.format_tb(exc.__traceback__) for line in frame.splitlines()
        )
        exc = exc.__cause__ or exc.__context__
    return lines


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            document["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            document["exception"] = type(record.exc_info[1]).__name__
            document["stack"] = exception_lines(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatException(self, ei: Any) -> str:  # logging's name
        return "\n".join(exception_lines(ei)) if ei[1] is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = current_request_id()
        return f"{line} [request_id={request_id}]" if request_id else line


class EveryFewSeconds(logging.Filter):
    """One record per message per `seconds` from the event loop's own logger (`asyncio`),
    the next one saying how many were left out. Out of file descriptors, its "socket.accept()
    out of system resource" came about 800,000 times in minutes, 420 MB of log, a second way
    to fill the disk (from review). Our own loggers say each problem once already."""

    LOGGERS = ("asyncio",)

    def __init__(self, seconds: float = 10.0) -> None:
        super().__init__()
        self.seconds = seconds
        self._last: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in self.LOGGERS:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        last, left_out = self._last.get(key, (float("-inf"), 0))
        if now - last < self.seconds:
            self._last[key] = (last, left_out + 1)
            return False
        self._last[key] = (now, 0)
        if left_out:
            record.msg = (
                f"{record.msg} (and {left_out} more like it in the last {self.seconds:g} s)"
            )
        return True


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Send every logger's records to stderr, in JSON (the default) or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(EveryFewSeconds())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request URL at INFO, alembic every schema check; neither helps here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Our middleware writes the access log, with the request id and the route template.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
