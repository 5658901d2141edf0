"""witnessed_checkpoints gets an index on (peer_authority, set_aside_at): every witness check
reads the peer's rows set aside whose date is no date, which would otherwise scan all of the
peer's rows (57 ms at 200,000 on SQLite, at every receipt that carries a checkpoint)

A set_aside_at that no date reads as took its row for set aside, and the peer's next
checkpoints were checked against an older one (app/audit/witnessed.py; from review). Rows are
set aside only when an operator accepts a peer's restore: on this index the check reads those
few, not the peer's checkpoints of every minute.

Revision ID: d5f1a8c3e296
Revises: c4e8b2d61f37
Create Date: 2026-11-30 12:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "d5f1a8c3e296"
down_revision: str | None = "c4e8b2d61f37"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_witnessed_checkpoints_peer_authority_set_aside_at"


def upgrade() -> None:
    op.create_index(
        INDEX, "witnessed_checkpoints", ["peer_authority", "set_aside_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="witnessed_checkpoints")
