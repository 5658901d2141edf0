"""outbox.priority and outbox.size_bytes get server defaults, for the processes of an earlier
release still running between `entraide migrate` and their restart

Those processes queue deliveries without the two columns (they predate a3c9e71d5b20): with the
columns NOT NULL and no default, every submission they took answered 500 until they were
stopped (from review; docs/operations.md §7 only said they report not ready, and a
single-node SQLite site has no load balancer to take them out). A row queued so is claimed as
routine, and budgeted as empty, until it is delivered: its order among others for a few
minutes of an upgrade, nothing lost.

Revision ID: c4e8b2d61f37
Revises: a7c3e5f19b42
Create Date: 2026-11-30 02:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4e8b2d61f37"
down_revision: str | None = "a7c3e5f19b42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.alter_column(
            "priority", existing_type=sa.SmallInteger(), server_default=sa.text("2")
        )
        batch_op.alter_column(
            "size_bytes", existing_type=sa.BigInteger(), server_default=sa.text("0")
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.alter_column("priority", existing_type=sa.SmallInteger(), server_default=None)
        batch_op.alter_column("size_bytes", existing_type=sa.BigInteger(), server_default=None)
