"""The event loop's own logger repeats one line as often as its cause recurs: out of file
descriptors, "socket.accept() out of system resource" came about 800,000 times in minutes,
420 MB of log (from review). One per message per ten seconds, the next saying how many were
left out; every other logger's records pass as they are."""

from __future__ import annotations

import logging

import pytest

from app.obs import logs


def _record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, None)


def test_a_repeated_event_loop_line_is_said_once_per_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    limit = logs.EveryFewSeconds(seconds=10)
    flood = [_record("asyncio", "socket.accept() out of system resource") for _ in range(5000)]
    assert sum(limit.filter(record) for record in flood) == 1
    other = _record("asyncio", "Task exception was never retrieved")
    assert limit.filter(other)  # another message: its own period
    ours = [_record("entraide.worker", "delivery round failed") for _ in range(3)]
    assert all(limit.filter(record) for record in ours)
    now[0] += 10
    later = _record("asyncio", "socket.accept() out of system resource")
    assert limit.filter(later)
    assert later.getMessage() == (
        "socket.accept() out of system resource (and 4999 more like it in the last 10 s)"
    )


def test_the_nodes_log_handler_limits_them() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        logs.configure_logging()
        (handler,) = root.handlers
        assert any(isinstance(found, logs.EveryFewSeconds) for found in handler.filters)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
