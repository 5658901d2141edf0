"""peers: suspended_at and suspended_reason, for exchanges an operator suspended

`entraide peers suspend` stops every exchange with a peer (nothing accepted from it, nothing
sent to it) without unpinning it: its keys stay, for what was exchanged before.

Revision ID: e6a1c93f0b27
Revises: d81e2f4a6c3b
Create Date: 2026-11-29 02:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "e6a1c93f0b27"
down_revision: str | None = "d81e2f4a6c3b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.add_column(
            sa.Column("suspended_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("suspended_reason", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.drop_column("suspended_reason")
        batch_op.drop_column("suspended_at")
