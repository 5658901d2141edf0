"""delivery counters: /metrics reads running totals, not the whole delivery history

Settlement adds to a total per attempt outcome and to the number of delivered rows, in the
attempt's own transaction; this revision starts them from the history already stored (one
pass over delivery_attempts and the outbox's state index).

Revision ID: ae9b40612b43
Revises: 49a8eff55d00
Create Date: 2026-11-28 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "ae9b40612b43"
down_revision: str | None = "49a8eff55d00"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery_counters",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_delivery_counters")),
    )
    op.execute(
        "INSERT INTO delivery_counters (name, value) "
        "SELECT 'attempts:' || outcome, COUNT(*) FROM delivery_attempts GROUP BY outcome"
    )
    op.execute(
        "INSERT INTO delivery_counters (name, value) "
        "SELECT 'delivered', COUNT(*) FROM outbox WHERE state = 'delivered'"
    )


def downgrade() -> None:
    op.drop_table("delivery_counters")
