"""outbox: the move each sent message made to its request (moved_from, moved_to,
postponed_before, question_before) and when it was undone or kept (move_undone_at, move_kept_at)

A message lost for good (refused, given up, cancelled, with no attempt that may have left it
with the peer) had moved this node's status where the peer never went, and the two nodes
stayed apart for good. The move is kept with the delivery and put back when the message is
lost. Rows queued before have none: their moves stay as they were.

Revision ID: b5f1c0d2e8a4
Revises: 7e4d2a9b1c55
Create Date: 2026-11-29 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "b5f1c0d2e8a4"
down_revision: str | None = "7e4d2a9b1c55"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("moved_from", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("moved_to", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("postponed_before", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("question_before", sa.String(length=32), nullable=True))
        batch_op.add_column(
            sa.Column("move_undone_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("move_kept_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("move_kept_at")
        batch_op.drop_column("move_undone_at")
        batch_op.drop_column("question_before")
        batch_op.drop_column("postponed_before")
        batch_op.drop_column("moved_to")
        batch_op.drop_column("moved_from")
