"""outbox.priority and outbox.size_bytes: the claim's order and budget on the outbox alone

The delivery worker's claim sorted the due rows by their request's urgency and budgeted them
by their message's size, joining both tables for every due row: with a backlog (a peer back
after an outage) and a long history, PostgreSQL merge-joined the whole of `messages` at each
round (0.7-0.8 s a claim with 20,000 due rows and a million messages, docs/benchmarks.md).
Neither value ever changes once a message is queued, so they are copied onto its outbox row,
and a partial index in the claim's order (priority, next_attempt_at, id) over the rows waiting
their turn (queued or retry) lets a claim read a round's rows and stop, locking none past them.
Its condition is written exactly as the claim writes it (app.models.OUTBOX_WAITING): a query
uses a partial index only then (on SQLite with a unary + that keeps the index on state out of
a planner without statistics). Filled in for the rows already there from `messages` and
`requests`.

Revision ID: a3c9e71d5b20
Revises: f2b7c4d9e815
Create Date: 2026-11-29 15:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a3c9e71d5b20"
down_revision: str | None = "f2b7c4d9e815"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# app.models.OUTBOX_WAITING as of this revision (a migration never imports the models).
WAITING = {
    "postgresql": "state IN ('queued', 'retry')",
    "sqlite": "+state IN ('queued', 'retry')",
}


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.SmallInteger(), nullable=True))
        batch_op.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    # app.delivery.outbox.priority_of: what the claim orders by.
    op.execute(
        "UPDATE outbox SET "
        "size_bytes = (SELECT messages.size_bytes FROM messages "
        "WHERE messages.id = outbox.message_id), "
        "priority = (SELECT CASE requests.urgency WHEN 'emergency' THEN 0 "
        "WHEN 'urgent' THEN 1 ELSE 2 END FROM messages JOIN requests "
        "ON requests.id = messages.request_id WHERE messages.id = outbox.message_id)"
    )
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.alter_column("priority", existing_type=sa.SmallInteger(), nullable=False)
        batch_op.alter_column("size_bytes", existing_type=sa.BigInteger(), nullable=False)
    op.create_index(
        "ix_outbox_claim_order",
        "outbox",
        ["priority", "next_attempt_at", "id"],
        postgresql_where=sa.text(WAITING["postgresql"]),
        sqlite_where=sa.text(WAITING["sqlite"]),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_claim_order", table_name="outbox")
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("size_bytes")
        batch_op.drop_column("priority")
