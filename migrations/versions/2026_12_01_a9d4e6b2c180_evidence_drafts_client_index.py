"""evidence_drafts gets an index on (created_by, state): each new draft counts its client's
open drafts, whose number and declared bytes are bounded per client

Revision ID: a9d4e6b2c180
Revises: f3c8a1d6b904
Create Date: 2026-12-01 05:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "a9d4e6b2c180"
down_revision: str | None = "f3c8a1d6b904"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_evidence_drafts_created_by_state"


def upgrade() -> None:
    op.create_index(INDEX, "evidence_drafts", ["created_by", "state"], unique=False)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="evidence_drafts")
