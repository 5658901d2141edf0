"""peers: part_signatures_since, when the peer first signed a streamed part's PUT

From then on its parts are taken only with a valid signature (protocol.md §8.5); a peer that
never signed one runs a release from before signatures, and its unsigned PUTs are taken, so
that authorities need not all upgrade at once.

Revision ID: f3c8a1d6b904
Revises: e7b2c9d4a153
Create Date: 2026-11-30 16:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "f3c8a1d6b904"
down_revision: str | None = "e7b2c9d4a153"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.add_column(
            sa.Column("part_signatures_since", app.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("peers") as batch_op:
        batch_op.drop_column("part_signatures_since")
