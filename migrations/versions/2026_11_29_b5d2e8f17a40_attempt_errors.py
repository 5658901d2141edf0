"""delivery_attempts.error: what the attempt met, without the give-up's wording

A delivery given up at its deadline wrote `gave up at the <urgency> deadline; last error: ...`
on its last attempt, which then no longer read as a connection that could not be made: a
peer never reached was taken to hold the message (`peer_may_hold`), so its move was never put
back. Attempts now keep the error they met (the delivery's `last_error` keeps the wording);
this gives the rows written before the same reading. Data only; the downgrade leaves them.

Revision ID: b5d2e8f17a40
Revises: c7e3b5a90f12
Create Date: 2026-11-29 06:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5d2e8f17a40"
down_revision: str | None = "c7e3b5a90f12"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GAVE_UP = "gave up at the % deadline; last error: %"
SEPARATOR = "; last error: "

attempts = sa.table("delivery_attempts", sa.column("id", sa.Integer), sa.column("error", sa.String))


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(attempts.c.id, attempts.c.error).where(attempts.c.error.like(GAVE_UP))
    ).all()
    for row in rows:
        met = row.error.split(SEPARATOR, 1)[1]
        connection.execute(sa.update(attempts).where(attempts.c.id == row.id).values(error=met))


def downgrade() -> None:
    pass  # the errors as met read right to the code before too
