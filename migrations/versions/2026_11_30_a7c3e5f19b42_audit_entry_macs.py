"""audit_entries.mac: a MAC on each entry, under a key derived from the log key

Entries no checkpoint covers yet were protected by no key: a database writer could rewrite
them, rebuild the hash links, and the next checkpoint signed the forgery. Each new entry now
carries a keyed BLAKE2b of its bytes (app/audit/mac.py), checked before a checkpoint signs it.
The migration has no key: the entries already there keep a NULL MAC (docs/audit.md §4 says
what a checkpoint does with them).

Revision ID: a7c3e5f19b42
Revises: a7c2e9d41f08
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c3e5f19b42"
down_revision: str | None = "a7c2e9d41f08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column with no default: no table rewrite on either backend.
    op.add_column("audit_entries", sa.Column("mac", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_entries") as batch_op:
        batch_op.drop_column("mac")
