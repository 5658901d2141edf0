"""audit index filled behind the log: appends write one entry row, not six index entries

The auditor's filter indexes move from audit_entries to a new table, audit_index, that the
delivery worker fills in batches (app/audit/index.py); this revision fills it with every
existing entry. audit_nodes keeps only the subtrees of 2**8 leaves and more: smaller ones are
hashed again from the entries' leaf hashes when a proof needs them (app/audit/log.py,
STORED_LEVEL). On a large log, expect the upgrade to read the whole log once.

Revision ID: 49a8eff55d00
Revises: 2d3babec7b5b
Create Date: 2026-11-28 03:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models
from app.audit.merkle import CompactRange

revision: str = "49a8eff55d00"
down_revision: str | None = "2d3babec7b5b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILTERED = ["recorded_at", "actor", "action", "request_id", "peer", "outcome"]
STORED_LEVEL = 8  # app/audit/log.py, as of this revision


def upgrade() -> None:
    op.create_table(
        "audit_index",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("recorded_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=140), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("outcome", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=True),
        sa.Column("peer", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("idx", name=op.f("pk_audit_index")),
    )
    # Rows first, indexes after: building an index from sorted rows is the cheap way.
    op.execute(
        "INSERT INTO audit_index (idx, recorded_at, actor, action, outcome, request_id, peer) "
        "SELECT idx, recorded_at, actor, action, outcome, request_id, peer FROM audit_entries"
    )
    for column in FILTERED:
        op.create_index(f"ix_audit_index_{column}_idx", "audit_index", [column, "idx"])
        op.drop_index(f"ix_audit_entries_{column}_idx", table_name="audit_entries")
    op.execute(
        sa.text("DELETE FROM audit_nodes WHERE level < :level").bindparams(level=STORED_LEVEL)
    )


def downgrade() -> None:
    for column in FILTERED:
        op.create_index(f"ix_audit_entries_{column}_idx", "audit_entries", [column, "idx"])
    op.drop_table("audit_index")
    _backfill_small_nodes()


def _backfill_small_nodes() -> None:
    """The subtrees below STORED_LEVEL again, as the previous revision stores them."""
    connection = op.get_bind()
    entries = sa.table(
        "audit_entries", sa.column("idx", sa.BigInteger()), sa.column("leaf_hash", sa.LargeBinary())
    )
    nodes = sa.table(
        "audit_nodes",
        sa.column("level", sa.Integer()),
        sa.column("position", sa.BigInteger()),
        sa.column("hash", sa.LargeBinary()),
    )
    compact = CompactRange()
    batch: list[dict[str, object]] = []

    def keep(level: int, position: int, digest: bytes) -> None:
        if level < STORED_LEVEL:
            batch.append({"level": level, "position": position, "hash": digest})

    for row in connection.execute(sa.select(entries.c.leaf_hash).order_by(entries.c.idx)):
        compact.append(row.leaf_hash, visit=keep)
        if len(batch) >= 5000:
            connection.execute(nodes.insert(), batch)
            batch.clear()
    if batch:
        connection.execute(nodes.insert(), batch)
