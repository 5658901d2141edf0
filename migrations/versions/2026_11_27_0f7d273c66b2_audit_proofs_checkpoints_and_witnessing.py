"""audit proofs, checkpoints and witnessing: stored subtree hashes, signed checkpoints,
peers' checkpoints with our cosignatures, split-view alarms

Revision ID: 0f7d273c66b2
Revises: b6bdb22bb194
Create Date: 2026-11-27 23:24:19.557979
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models
from app.audit.merkle import CompactRange

revision: str = "0f7d273c66b2"
down_revision: str | None = "b6bdb22bb194"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_checkpoints_size"), ["size"], unique=False)

    op.create_table(
        "audit_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("level", "position", name=op.f("pk_audit_nodes")),
    )
    op.create_table(
        "witness_alarms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("peer_authority", sa.String(length=40), nullable=False),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("known_note", sa.Text(), nullable=False),
        sa.Column("new_note", sa.Text(), nullable=False),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_witness_alarms")),
    )
    with op.batch_alter_table("witness_alarms", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_witness_alarms_peer_authority"), ["peer_authority"], unique=False
        )

    op.create_table(
        "witnessed_checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("peer_authority", sa.String(length=40), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("cosignature", sa.Text(), nullable=True),
        sa.Column("received_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_witnessed_checkpoints")),
        sa.UniqueConstraint(
            "peer_authority",
            "size",
            "root_hash",
            name=op.f("uq_witnessed_checkpoints_peer_authority"),
        ),
    )
    with op.batch_alter_table("witnessed_checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_witnessed_checkpoints_peer_authority"), ["peer_authority"], unique=False
        )

    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_leaf_hash", sa.LargeBinary(), nullable=True))
        batch_op.add_column(
            sa.Column("last_checkpoint_size", sa.BigInteger(), nullable=False, server_default="0")
        )
    _backfill_nodes()


def _backfill_nodes() -> None:
    """Store the subtree hashes of entries written before this revision, for proofs."""
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
    head = sa.table(
        "audit_head", sa.column("id", sa.Integer()), sa.column("last_leaf_hash", sa.LargeBinary())
    )
    compact = CompactRange()
    batch: list[dict[str, object]] = []

    def keep(level: int, position: int, digest: bytes) -> None:
        batch.append({"level": level, "position": position, "hash": digest})

    last: bytes | None = None
    for row in connection.execute(sa.select(entries.c.leaf_hash).order_by(entries.c.idx)):
        compact.append(row.leaf_hash, visit=keep)
        last = row.leaf_hash
        if len(batch) >= 1000:
            connection.execute(nodes.insert(), batch)
            batch.clear()
    if batch:
        connection.execute(nodes.insert(), batch)
    connection.execute(head.update().where(head.c.id == 1).values(last_leaf_hash=last))


def downgrade() -> None:
    with op.batch_alter_table("audit_head", schema=None) as batch_op:
        batch_op.drop_column("last_checkpoint_size")
        batch_op.drop_column("last_leaf_hash")

    with op.batch_alter_table("witnessed_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_witnessed_checkpoints_peer_authority"))

    op.drop_table("witnessed_checkpoints")
    with op.batch_alter_table("witness_alarms", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_witness_alarms_peer_authority"))

    op.drop_table("witness_alarms")
    op.drop_table("audit_nodes")
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_checkpoints_size"))

    op.drop_table("audit_checkpoints")
