"""idempotency_keys: a case system's Idempotency-Key on a submission, and its answer

A submission whose answer was lost (a timeout) can be sent again with the same key: the node
answers as the first time and sends nothing twice.

Revision ID: d81e2f4a6c3b
Revises: b5f1c0d2e8a4
Create Date: 2026-11-29 00:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "d81e2f4a6c3b"
down_revision: str | None = "b5f1c0d2e8a4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("created_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["client_id"], ["api_clients.id"]),
        sa.PrimaryKeyConstraint("client_id", "key"),
    )
    op.create_index(
        op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
