"""peers.witness_anchor_max_id: a peer whose restore was accepted, not yet anchored

After `entraide peers accept-restore`, the peer's new checkpoints must be proven to extend a
checkpoint witnessed before the restore (ids up to this one); cleared once one is. Kept on
the peer, by id: comparing the times of two machines' clocks decided it before.

Revision ID: c7e3b5a90f12
Revises: a4c8e2f61d93
Create Date: 2026-11-29 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c7e3b5a90f12"
down_revision: str | None = "a4c8e2f61d93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.add_column(sa.Column("witness_anchor_max_id", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.drop_column("witness_anchor_max_id")
