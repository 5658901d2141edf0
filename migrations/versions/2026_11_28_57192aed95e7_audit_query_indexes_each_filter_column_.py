"""audit query indexes: each filter column paired with idx, so the auditor's filtered,
newest-first query reads one index backwards from its cursor instead of sorting matches

Replaces the single-column indexes on audit_entries (and adds one for outcome). Building
them reads the whole log once; on a large PostgreSQL log, expect writes to the audit log to
wait for that.

Revision ID: 57192aed95e7
Revises: d9ca24a52ff9
Create Date: 2026-11-28 00:15:55.058851
"""

from collections.abc import Sequence

from alembic import op

revision: str = "57192aed95e7"
down_revision: str | None = "d9ca24a52ff9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILTERED = ["recorded_at", "actor", "action", "request_id", "peer", "outcome"]
SINGLE = ["recorded_at", "actor", "action", "request_id", "peer"]  # before this revision


def upgrade() -> None:
    for column in FILTERED:
        op.create_index(f"ix_audit_entries_{column}_idx", "audit_entries", [column, "idx"])
    for column in SINGLE:
        op.drop_index(f"ix_audit_entries_{column}", table_name="audit_entries")


def downgrade() -> None:
    for column in SINGLE:
        op.create_index(f"ix_audit_entries_{column}", "audit_entries", [column])
    for column in FILTERED:
        op.drop_index(f"ix_audit_entries_{column}_idx", table_name="audit_entries")
