"""evidence_drafts.request_id: a draft with large evidence may answer a request

A draft used to open a new request only (its id becomes the request's). A requested authority
returns evidence in a reply, on the request it received: the draft now names that request, so
the need-to-know check of every draft route applies the request's restriction, and submission
seals a message of its conversation. Null for a draft that opens a request.

Revision ID: a7c2e9d41f08
Revises: d2b7f9c40e58
Create Date: 2026-11-30 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c2e9d41f08"
down_revision: str | None = "d2b7f9c40e58"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evidence_drafts") as batch_op:
        batch_op.add_column(sa.Column("request_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("evidence_drafts") as batch_op:
        batch_op.drop_column("request_id")
