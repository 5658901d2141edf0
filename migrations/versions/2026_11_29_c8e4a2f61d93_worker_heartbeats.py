"""worker_heartbeats: which delivery workers are running, whatever process runs them

Each delivery worker writes its row periodically and removes it when it stops; `/readyz`,
`/metrics` and `entraide doctor` of any process read them, so that a node whose deliveries run
in `entraide worker` processes of their own can tell that none is running.

Revision ID: c8e4a2f61d93
Revises: b5d2e8f31a47
Create Date: 2026-11-29 18:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "c8e4a2f61d93"
down_revision: str | None = "b5d2e8f31a47"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker_id", sa.String(length=80), nullable=False),
        sa.Column("started_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("seen_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_worker_heartbeats")),
    )


def downgrade() -> None:
    op.drop_table("worker_heartbeats")
