"""Every P2P call is asked, before its route runs, whether its address is blocked (and with
mutual TLS whether its certificate is pinned). Those checks only read, yet each took SQLite's
write lock up front: every call queued behind the node's writes (another call's, the delivery
worker's, a backup's) and held up the next one. They now wait for no writer; an address that
is blocked still has its attempt counted, which writes. So do the proofs anyone may fetch to
witness the node's log: a caller who pays nothing for them could hold the node's writes off."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import select

from app.audit.log import read_head, record
from app.auth.throttle import address_unit
from app.db import unit_of_work
from app.deps import p2p_blocked_for, record_p2p_refusal
from app.models import AuthThrottle
from tests.conftest import make_databases
from tests.requests.conftest import serve_node

HELD_SECONDS = 2.0
T = TypeVar("T")


def _hold_the_write_lock(path: str, taken: threading.Event) -> None:
    holder = sqlite3.connect(path, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        taken.set()
        time.sleep(HELD_SECONDS)
        holder.rollback()
    finally:
        holder.close()


def _while_a_writer_holds_the_lock(url: str, call: Callable[[], T]) -> tuple[T, float]:
    """`call`'s answer, and how long it took, while another connection holds the write lock
    for HELD_SECONDS."""
    taken = threading.Event()
    writer = threading.Thread(
        target=_hold_the_write_lock, args=(url.removeprefix("sqlite:///"), taken)
    )
    writer.start()
    try:
        assert taken.wait(10)
        started = time.monotonic()
        answer = call()
        return answer, time.monotonic() - started
    finally:
        writer.join()


def test_the_block_check_waits_for_no_writer(tmp_path: Path) -> None:
    url = make_databases("sqlite", tmp_path).new("ar", migrated=True)
    with serve_node(url, tmp_path) as ar:
        blocked, waited = _while_a_writer_holds_the_lock(
            url, lambda: p2p_blocked_for(ar.node, "192.0.2.7")
        )
        assert blocked is None
        # It waited for the writer to finish (HELD_SECONDS) before.
        assert waited < HELD_SECONDS / 2, waited

        # A blocked address: answered with its wait, and the attempt counted.
        ar.node.settings.p2p_refusal_limit = 1
        for _ in range(2):
            with unit_of_work(ar.node.sessions) as session:
                record_p2p_refusal(session, ar.node, "192.0.2.9")
        key = f"p2p:{address_unit('192.0.2.9')}"

        def suppressed() -> int:
            with unit_of_work(ar.node.sessions) as session:
                return int(
                    session.scalar(select(AuthThrottle.suppressed).where(AuthThrottle.key == key))
                    or 0
                )

        before = suppressed()
        retry_after = p2p_blocked_for(ar.node, "192.0.2.9")
        assert retry_after is not None
        assert retry_after > 0
        assert suppressed() == before + 1


def test_a_consistency_proof_waits_for_no_writer(tmp_path: Path) -> None:
    url = make_databases("sqlite", tmp_path).new("ar", migrated=True)
    with serve_node(url, tmp_path) as ar:
        for _ in range(3):  # a log to prove something of
            with unit_of_work(ar.node.sessions) as session:
                record(session, actor="node", action="node.started")
        with unit_of_work(ar.node.sessions) as session:
            size = read_head(session).size
        assert size >= 3
        answer, waited = _while_a_writer_holds_the_lock(
            url,
            lambda: ar.http.get("/p2p/v1/audit/consistency", params={"first": 1, "second": size}),
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["second"] == size
        assert waited < HELD_SECONDS / 2, waited


def test_asking_where_a_part_stands_waits_for_no_writer(tmp_path: Path) -> None:
    """Anyone who knows a transfer's msg_id may ask, as often as it likes (only refusals
    are counted): each HEAD took the writer's lock, and queued behind every write."""
    url = make_databases("sqlite", tmp_path).new("ar", migrated=True)
    with serve_node(url, tmp_path) as ar:
        _, _, href = ar.announce_streamed()
        answer, waited = _while_a_writer_holds_the_lock(url, lambda: ar.http.head(href))
        assert (answer.status_code, answer.headers["upload-offset"]) == (204, "0")
        assert waited < HELD_SECONDS / 2, waited
