"""witnessed_checkpoints.set_aside_at, witness_alarms.resolved_at and resolution

`entraide peers accept-restore` lets an operator accept that a peer's log was restored from
a backup (its operator said so out of band): the checkpoints witnessed before are set aside
and the alarms they raised are closed, with the reason; both stay on record.

Revision ID: a4c8e2f61d93
Revises: e6a1c93f0b27
Create Date: 2026-11-29 02:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "a4c8e2f61d93"
down_revision: str | None = "e6a1c93f0b27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("witnessed_checkpoints") as batch_op:
        batch_op.add_column(
            sa.Column("set_aside_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("witness_alarms") as batch_op:
        batch_op.add_column(
            sa.Column("resolved_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("resolution", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("witness_alarms") as batch_op:
        batch_op.drop_column("resolution")
        batch_op.drop_column("resolved_at")
    with op.batch_alter_table("witnessed_checkpoints") as batch_op:
        batch_op.drop_column("set_aside_at")
