"""requests: question_msg_id, the latest question this node asked in a conversation

An answer (additional_information) must follow the latest question, not an earlier one it
crossed on the way (else the two nodes took it for answers to different questions). Requests
stored before have none: their answers are judged as before.

Revision ID: 7e4d2a9b1c55
Revises: c3a9e1d24f70
Create Date: 2026-11-28 21:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7e4d2a9b1c55"
down_revision: str | None = "c3a9e1d24f70"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch_op:
        batch_op.add_column(sa.Column("question_msg_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_column("question_msg_id")
