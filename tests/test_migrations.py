"""The migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from nacl.signing import SigningKey
from sqlalchemy import Engine, LargeBinary, delete, insert, inspect, select, text, update

from app.audit.log import STORED_LEVEL, record
from app.audit.mac import append_with
from app.audit.merkle import EMPTY_ROOT, CompactRange
from app.audit.service import prove_consistency
from app.crypto.encoding import utc_now
from app.db import make_engine, make_session_factory, unit_of_work
from app.delivery import outbox
from app.migrate import ROOT, alembic_config, pending, upgrade
from app.models import (
    AuditEntry,
    AuditHead,
    AuditIndex,
    AuditNode,
    Base,
    DeliveryAttempt,
    DeliveryCounter,
    Message,
    OutboxItem,
)
from tests.conftest import Databases
from tests.test_outbox import _history_totals, _queue

BEFORE_AUDIT_INDEX = "2d3babec7b5b"


def test_alembic_upgrade_head_on_an_empty_database(databases: Databases) -> None:
    url = databases.new("migrations")
    env = {**os.environ, "ENTRAIDE_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert not pending(engine, url)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
            head = connection.execute(select(AuditHead)).one()
            assert head.size == 0
            assert head.root_hash == EMPTY_ROOT
            assert CompactRange.from_bytes(head.compact_range).size == 0
    finally:
        engine.dispose()


def _schema_and_rows(url: str) -> tuple[object, dict[str, list[dict[str, Any]]]]:
    """Every table's columns, indexes and constraints, and every row, as read back."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            found = inspect(connection)
            schema = {
                name: [
                    repr(part)
                    for part in (
                        found.get_columns(name),
                        found.get_pk_constraint(name),
                        found.get_foreign_keys(name),
                        found.get_unique_constraints(name),
                        found.get_check_constraints(name),
                        sorted(index["name"] or "" for index in found.get_indexes(name)),
                    )
                ]
                for name in found.get_table_names()
            }
            rows = {
                table.name: [dict(row._mapping) for row in connection.execute(select(table))]
                for table in Base.metadata.sorted_tables
            }
            rows["alembic_version"] = [
                dict(row._mapping)
                for row in connection.execute(text("SELECT * FROM alembic_version"))
            ]
    finally:
        engine.dispose()
    return schema, rows


def test_a_migrated_copy_is_what_the_migrations_make(databases: Databases) -> None:
    """The tests' migrated databases are copies of one migrated once per test process
    (tests/conftest.py): they stand for `alembic upgrade head` on an empty database only while
    no migration writes what differs from one run to the next. The one such value, the empty
    log's head row's date, is a time already past when the copy is used."""
    url = databases.new("from-empty")
    upgrade(url)
    schema, rows = _schema_and_rows(url)
    copy_schema, copy_rows = _schema_and_rows(databases.new("copy", migrated=True))
    assert copy_schema == schema
    for head in (*rows["audit_head"], *copy_rows["audit_head"]):
        assert head.pop("updated_at") <= utc_now()
    assert copy_rows == rows


def test_audit_index_revision_keeps_the_log_provable_both_ways(databases: Databases) -> None:
    """49a8eff55d00 indexes the existing log, drops the small subtrees; downgrading puts the
    small subtrees back exactly as appends used to store them."""
    url = databases.new("audit-index")
    upgrade(url, BEFORE_AUDIT_INDEX)
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    count = 300
    try:
        # Today's appends write each entry's MAC, a column this revision predates: it is there
        # only while they write.
        blob = LargeBinary().compile(dialect=engine.dialect)
        with engine.begin() as connection:
            connection.execute(text(f"ALTER TABLE audit_entries ADD COLUMN mac {blob}"))
        with unit_of_work(sessions) as session:
            for number in range(count):
                record(session, actor="node", action="test.event", details={"n": number})
        with engine.begin() as connection:
            connection.execute(text("ALTER TABLE audit_entries DROP COLUMN mac"))
        every_node = _all_nodes(engine)
        with engine.begin() as connection:  # what appends stored before this revision
            connection.execute(delete(AuditNode))
            connection.execute(insert(AuditNode), every_node)
        upgrade(url)
        with engine.connect() as connection:
            indexed = connection.scalars(select(AuditIndex.idx).order_by(AuditIndex.idx))
            assert list(indexed) == list(range(count))
            levels = set(connection.scalars(select(AuditNode.level)))
            assert min(levels) == STORED_LEVEL
        with unit_of_work(sessions) as session:
            proof = prove_consistency(session, first=100, second=count)
            assert len(proof["proof"]) > 0
        command.downgrade(alembic_config(url), BEFORE_AUDIT_INDEX)
        assert not inspect(engine).has_table("audit_index")
        with engine.connect() as connection:
            stored = connection.execute(select(AuditNode.level, AuditNode.position, AuditNode.hash))
            assert sorted(tuple(row) for row in stored) == sorted(
                (node["level"], node["position"], node["hash"]) for node in every_node
            )
    finally:
        engine.dispose()


def _all_nodes(engine: Engine) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = []
    compact = CompactRange()
    with engine.connect() as connection:
        for leaf in connection.scalars(select(AuditEntry.leaf_hash).order_by(AuditEntry.idx)):
            compact.append(
                leaf,
                visit=lambda level, position, digest: nodes.append(
                    {"level": level, "position": position, "hash": digest}
                ),
            )
    return nodes


BEFORE_DELIVERY_COUNTERS = "49a8eff55d00"


def test_delivery_counters_start_from_the_stored_history(databases: Databases) -> None:
    """ae9b40612b43 gives /metrics running totals: they start from what is already stored."""
    url = databases.new("delivery-counters")
    upgrade(url, BEFORE_DELIVERY_COUNTERS)
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    try:
        with unit_of_work(sessions) as session:
            rows = _queue(session, 3, before_a3c9=True)
            now = utc_now()
            for number, (row, outcome) in enumerate(
                zip(rows, ["delivered", "retry", "retry"], strict=True)
            ):
                session.add(
                    DeliveryAttempt(
                        outbox_id=row,
                        attempt=number + 1,
                        worker="w",
                        started_at=now,
                        finished_at=now,
                        outcome=outcome,
                    )
                )
            # These columns only, as _queue: the model holds columns of later revisions.
            session.execute(
                update(OutboxItem).where(OutboxItem.id == rows[0]).values(state="delivered")
            )
        upgrade(url)
        with unit_of_work(sessions) as session:
            kept = dict(session.execute(select(DeliveryCounter.name, DeliveryCounter.value)).all())
            assert kept == _history_totals(session)
            assert kept == {"attempts:delivered": 1, "attempts:retry": 2, "delivered": 1}
        command.downgrade(alembic_config(url), BEFORE_DELIVERY_COUNTERS)
        assert not inspect(engine).has_table("delivery_counters")
    finally:
        engine.dispose()


def test_attempts_given_up_before_b5d2e8f17a40_keep_the_error_they_met(
    databases: Databases,
) -> None:
    """A delivery given up at its deadline before the fix wrote the give-up's wording on its
    last attempt: a peer never reached read as one that may hold the message."""
    url = databases.new("attempt-errors")
    upgrade(url, "c7e3b5a90f12")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    met = {
        "never reached": "gave up at the routine deadline; last error: transport: ConnectError",
        "no answer": "gave up at the urgent deadline; last error: transport: ReadTimeout",
        "plain": "transport: ConnectError",
    }
    try:
        with unit_of_work(sessions) as session:
            rows = dict(zip(met, _queue(session, 3, before_a3c9=True), strict=True))
            now = utc_now()
            for name, row in rows.items():
                session.add(
                    DeliveryAttempt(
                        outbox_id=row,
                        attempt=1,
                        worker="w",
                        started_at=now,
                        finished_at=now,
                        outcome="failed",
                        error=met[name],
                    )
                )
        with unit_of_work(sessions) as session:
            assert outbox.peer_may_hold(session, rows["never reached"])  # the defect
        upgrade(url)
        with unit_of_work(sessions) as session:
            errors = dict(
                session.execute(select(DeliveryAttempt.outbox_id, DeliveryAttempt.error)).all()
            )
            assert errors == {
                rows["never reached"]: "transport: ConnectError",
                rows["no answer"]: "transport: ReadTimeout",
                rows["plain"]: "transport: ConnectError",
            }
            assert not outbox.peer_may_hold(session, rows["never reached"])
            assert outbox.peer_may_hold(session, rows["no answer"])
    finally:
        engine.dispose()


def test_deliveries_queued_before_f2b7c4d9e815_know_their_request(databases: Databases) -> None:
    """The claim's order check reads the outbox's own request column: rows queued before it
    existed get it from their message, or they would never be held back."""
    url = databases.new("outbox-request")
    upgrade(url, "b5d2e8f17a40")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    try:
        with unit_of_work(sessions) as session:
            rows = _queue(session, 2, before_a3c9=True)
        upgrade(url)
        with unit_of_work(sessions) as session:
            found = session.execute(
                select(OutboxItem.request_id, Message.request_id)
                .join(Message, Message.id == OutboxItem.message_id)
                .where(OutboxItem.id.in_(rows))
            ).all()
        assert len(found) == 2
        assert all(copied == original for copied, original in found)
    finally:
        engine.dispose()


def test_deliveries_queued_before_a3c9e71d5b20_keep_their_place_in_the_claim(
    databases: Databases,
) -> None:
    """The claim orders and budgets rows by the outbox's own priority and size: rows queued
    before those columns existed get them from their request and message, so an emergency
    queued then still goes first, and a large envelope still waits for a round that can
    take it."""
    url = databases.new("outbox-claim-order")
    upgrade(url, "f2b7c4d9e815")
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    try:
        with unit_of_work(sessions) as session:
            routine = _queue(session, 1, before_a3c9=True)
            large = _queue(session, 1, size=10 * 2**20, before_a3c9=True)
            urgent = _queue(session, 1, urgency="urgent", before_a3c9=True)
            emergency = _queue(session, 1, urgency="emergency", before_a3c9=True)
        upgrade(url)
        with unit_of_work(sessions) as session:
            claims = outbox.claim_due(
                session,
                now=utc_now() + timedelta(seconds=1),
                lease=timedelta(seconds=60),
                limit=10,
                owner="w",
                max_size=2**20,
            )
            assert [claim.outbox_id for claim in claims] == [*emergency, *urgent, *routine]
            sizes = dict(session.execute(select(OutboxItem.id, OutboxItem.size_bytes)).all())
            assert sizes[large[0]] == 10 * 2**20
    finally:
        engine.dispose()


def test_a_process_of_an_earlier_release_can_still_queue_after_the_migration(
    databases: Databases,
) -> None:
    """From review: between `entraide migrate` and its restart, a `serve` of a release before
    a3c9e71d5b20 queued deliveries without `priority` and `size_bytes`, and every submission
    it took answered 500 (NOT NULL). Its rows now take the defaults: queued, and claimed."""
    url = databases.new("outbox-order-defaults", migrated=True)
    engine = make_engine(url)
    sessions = append_with(make_session_factory(engine), SigningKey.generate())
    try:
        with unit_of_work(sessions) as session:
            (old,) = _queue(session, 1, before_a3c9=True)  # the INSERT of such a process
            (new,) = _queue(session, 1, urgency="urgent")
        with unit_of_work(sessions) as session:
            stored = session.execute(
                select(OutboxItem.priority, OutboxItem.size_bytes).where(OutboxItem.id == old)
            ).one()
            assert tuple(stored) == (2, 0)
            claims = outbox.claim_due(
                session,
                now=utc_now() + timedelta(seconds=1),
                lease=timedelta(seconds=60),
                limit=10,
                owner="w",
                max_size=2**20,
            )
            assert [claim.outbox_id for claim in claims] == [new, old]
    finally:
        engine.dispose()


def test_plaintext_hashes_in_clear_are_erased_where_a_sealed_manifest_holds_them(
    databases: Databases,
) -> None:
    """Before b5d2e8f31a47 an upload's plaintext SHA-256 was kept in clear, and after its
    draft was submitted too (from review): the migration erases those of submitted drafts
    (their manifests carry them, sealed) and keeps those of open drafts, which their
    submission needs and erases; going back is refused while a sealed hash would be lost."""
    url = databases.new("sealed-sha256")
    upgrade(url, "a3c9e71d5b20")
    engine = make_engine(url)
    now = utc_now()
    try:
        with engine.begin() as connection:
            for draft, state in (("a" * 32, "submitted"), ("b" * 32, "open")):
                connection.execute(
                    text(
                        "INSERT INTO evidence_drafts (id, peer_authority, created_by, state, "
                        "key_kid, key_wrap, sealed_content, created_at, updated_at) VALUES "
                        "(:id, 'AR/MPF', 'client:officer', :state, 'k', :blob, :blob, :now, :now)"
                    ),
                    {"id": draft, "state": state, "blob": b"\x00", "now": now},
                )
                connection.execute(
                    text(
                        "INSERT INTO evidence_uploads (draft_id, part_index, size, "
                        "stream_header, digest, length, plaintext_sha256) VALUES "
                        "(:id, 1, 5, :blob, :digest, 22, :plain)"
                    ),
                    {"id": draft, "blob": b"\x00" * 24, "digest": "d" * 64, "plain": "e" * 64},
                )
        upgrade(url)
        with engine.begin() as connection:
            rows = dict(
                connection.execute(
                    text("SELECT draft_id, plaintext_sha256 FROM evidence_uploads")
                ).all()
            )
            assert rows == {"a" * 32: None, "b" * 32: "e" * 64}
            connection.execute(
                text("UPDATE evidence_uploads SET plaintext_sha256 = NULL, sealed_sha256 = :s"),
                {"s": b"sealed"},
            )
        with pytest.raises(RuntimeError, match="submit or discard those drafts"):
            command.downgrade(alembic_config(url), "a3c9e71d5b20")
    finally:
        engine.dispose()
