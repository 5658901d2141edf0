"""request lifecycle: deadlines, handling, need-to-know officers

Revision ID: d9ca24a52ff9
Revises: d67e9bc689c3
Create Date: 2026-11-27 23:44:38.659686
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "d9ca24a52ff9"
down_revision: str | None = "d67e9bc689c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Statuses of the first, partial lifecycle, and what they are in the full one.
LEGACY_STATUSES = {
    "received": "delivered",
    "in_consultation": "acknowledged",
    "answered": "executed",
}


def upgrade() -> None:
    op.create_table(
        "request_officers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=32), nullable=False),
        sa.Column("client_name", sa.String(length=100), nullable=False),
        sa.Column("assigned_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("assigned_by", sa.String(length=140), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name=op.f("fk_request_officers_request_id_requests")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_officers")),
        sa.UniqueConstraint(
            "request_id", "client_name", name=op.f("uq_request_officers_request_id")
        ),
    )
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requested_date", sa.Date(), nullable=True))
        batch_op.add_column(
            sa.Column("acknowledge_by", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("decide_by", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("execute_by", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("postponed_until", sa.Date(), nullable=True))
        batch_op.add_column(
            sa.Column("due_at", app.models.UTCDateTime(timezone=True), nullable=True)
        )
        # Existing rows: standard handling, unrestricted (as they were). Their deadlines stay
        # empty: computing them would need the sealed documents, and they were never promised.
        batch_op.add_column(
            sa.Column("handling", sa.String(length=16), server_default="standard", nullable=False)
        )
        batch_op.add_column(
            sa.Column("restricted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_requests_due_at"), ["due_at"], unique=False)

    requests = sa.table("requests", sa.column("status", sa.String))
    for old, new in LEGACY_STATUSES.items():
        op.execute(requests.update().where(requests.c.status == old).values(status=new))


def downgrade() -> None:
    # Back to the statuses the older code knows; the states it never had stay as they are.
    requests = sa.table(
        "requests", sa.column("status", sa.String), sa.column("direction", sa.String)
    )
    op.execute(
        requests.update()
        .where(requests.c.status == "delivered", requests.c.direction == "inbound")
        .values(status="received")
    )
    op.execute(requests.update().where(requests.c.status == "executed").values(status="answered"))

    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_requests_due_at"))
        batch_op.drop_column("restricted")
        batch_op.drop_column("handling")
        batch_op.drop_column("due_at")
        batch_op.drop_column("postponed_until")
        batch_op.drop_column("execute_by")
        batch_op.drop_column("decide_by")
        batch_op.drop_column("acknowledge_by")
        batch_op.drop_column("requested_date")

    op.drop_table("request_officers")
