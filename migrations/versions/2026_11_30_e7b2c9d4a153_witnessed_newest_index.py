"""witnessed_checkpoints gets an index on (peer_authority, id): every witness check reads the
peer's newest row, on PostgreSQL as on SQLite

A peer's checkpoints mostly arrive in order, so its largest row is mostly its newest: reading
the newest, the check reads a size rewritten lower on the largest, which it passed over on
PostgreSQL (its (peer_authority) index has no order of ids; from review).

Revision ID: e7b2c9d4a153
Revises: d5f1a8c3e296
Create Date: 2026-11-30 15:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "e7b2c9d4a153"
down_revision: str | None = "d5f1a8c3e296"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_witnessed_checkpoints_peer_authority_id"


def upgrade() -> None:
    op.create_index(INDEX, "witnessed_checkpoints", ["peer_authority", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="witnessed_checkpoints")
