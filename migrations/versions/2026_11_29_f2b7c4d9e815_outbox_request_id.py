"""outbox.request_id: which request a delivery belongs to, indexed with the row's id

A conversation's messages are posted in the order they were written, each once the one before
it is settled (app/delivery/outbox.py, `claim_due`). Reading that through `messages` made
PostgreSQL hash every message ever stored at each claim once a backlog built up (2.9 s a round
with 5 million messages, from review); on the outbox itself it is one index probe per row
due. Filled in from `messages` for the rows already there.

Revision ID: f2b7c4d9e815
Revises: b5d2e8f17a40
Create Date: 2026-11-29 12:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f2b7c4d9e815"
down_revision: str | None = "b5d2e8f17a40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.String(length=32), nullable=True))
    op.execute(
        "UPDATE outbox SET request_id = "
        "(SELECT messages.request_id FROM messages WHERE messages.id = outbox.message_id)"
    )
    op.create_index("ix_outbox_request_id_id", "outbox", ["request_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_request_id_id", table_name="outbox")
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("request_id")
