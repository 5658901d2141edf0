"""peer keys: revoked_at, for a key an operator replaced as compromised

`entraide peers replace-key` keeps the old keys in the history (the archive received under
them stays verifiable) and marks them revoked: they never verify a new envelope again.

Revision ID: c3a9e1d24f70
Revises: ae9b40612b43
Create Date: 2026-11-28 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "c3a9e1d24f70"
down_revision: str | None = "ae9b40612b43"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("peer_keys") as batch_op:
        batch_op.add_column(
            sa.Column("revoked_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("peer_keys") as batch_op:
        batch_op.drop_column("revoked_at")
