"""worker_heartbeats.expires_at: each heartbeat says until when it vouches for its worker

Readers compared a row's `seen_at` with their own clock and their own setting of the
heartbeat's period: a worker on a host whose clock ran ahead counted as alive long after it
died, and a worker set to beat less often than the reader expected counted as gone. A row now
carries its own expiry, computed by its worker on the database's clock. The rows are transient
(each running worker writes its own within seconds): those there are dropped.

Revision ID: d2b7f9c40e58
Revises: c8e4a2f61d93
Create Date: 2026-11-29 19:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "d2b7f9c40e58"
down_revision: str | None = "c8e4a2f61d93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM worker_heartbeats")
    with op.batch_alter_table("worker_heartbeats") as batch_op:
        batch_op.add_column(
            sa.Column("expires_at", app.models.UTCDateTime(timezone=True), nullable=False)
        )
        batch_op.create_index(
            batch_op.f("ix_worker_heartbeats_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("worker_heartbeats") as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_heartbeats_expires_at"))
        batch_op.drop_column("expires_at")
