"""security: refusal throttling counters, peer key history, pinned TLS client certificates

Revision ID: d67e9bc689c3
Revises: fbeaf779db38
Create Date: 2026-11-27 23:43:33.902104
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models

revision: str = "d67e9bc689c3"
down_revision: str | None = "fbeaf779db38"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_throttle",
        sa.Column("key", sa.String(length=120), nullable=False),
        sa.Column("window_start", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("blocked_until", app.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("suppressed", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_auth_throttle")),
    )
    op.create_table(
        "peer_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("peer_authority", sa.String(length=40), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("kid", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("pinned_at", app.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", app.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_peer_keys")),
        sa.UniqueConstraint(
            "peer_authority", "purpose", "kid", name=op.f("uq_peer_keys_peer_authority")
        ),
    )
    with op.batch_alter_table("peer_keys", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_peer_keys_peer_authority"), ["peer_authority"], unique=False
        )
    # Peers pinned before this revision: their current keys start the history.
    op.execute(
        "INSERT INTO peer_keys (peer_authority, purpose, kid, public_key, pinned_at) "
        "SELECT authority_id, 'signing', signing_kid, signing_key, added_at FROM peers"
    )
    op.execute(
        "INSERT INTO peer_keys (peer_authority, purpose, kid, public_key, pinned_at) "
        "SELECT authority_id, 'encryption', encryption_kid, encryption_key, added_at FROM peers"
    )
    with op.batch_alter_table("peers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tls_client_cert_sha256", sa.String(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("peers", schema=None) as batch_op:
        batch_op.drop_column("tls_client_cert_sha256")
    with op.batch_alter_table("peer_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_peer_keys_peer_authority"))
    op.drop_table("peer_keys")
    op.drop_table("auth_throttle")
