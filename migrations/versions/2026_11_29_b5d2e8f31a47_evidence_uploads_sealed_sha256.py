"""evidence_uploads.sealed_sha256: an attachment's plaintext SHA-256 kept encrypted

An upload's plaintext SHA-256 was stored in clear until its draft was submitted, and kept
after: anyone holding a copy of the database (or a backup) could confirm that a known file
was sent to a given authority, when only routing metadata may be in clear (DESIGN.md). It is
now kept sealed under a key derived from the attachment's part key (app/evidence/drafts.py),
which only the node's private key opens. This revision cannot seal the hashes already stored
(it holds no key): those of submitted drafts, which their sealed manifests carry, are erased;
those of drafts still open stay until their submission or discard erases them.

Revision ID: b5d2e8f31a47
Revises: a3c9e71d5b20
Create Date: 2026-11-29 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b5d2e8f31a47"
down_revision: str | None = "a3c9e71d5b20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evidence_uploads") as batch_op:
        batch_op.add_column(sa.Column("sealed_sha256", sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE evidence_uploads SET plaintext_sha256 = NULL WHERE draft_id IN "
        "(SELECT id FROM evidence_drafts WHERE state = 'submitted')"
    )


def downgrade() -> None:
    # The code before this revision cannot open a sealed hash, and an attachment cannot be
    # uploaded again under its stream header (its key stream is spent): refused, not guessed.
    waiting = op.get_bind().scalar(
        sa.text(
            "SELECT count(*) FROM evidence_uploads WHERE sealed_sha256 IS NOT NULL "
            "AND plaintext_sha256 IS NULL AND draft_id IN "
            "(SELECT id FROM evidence_drafts WHERE state = 'open')"
        )
    )
    if waiting:
        raise RuntimeError(
            f"{waiting} uploaded attachments of open drafts hold their hash sealed: "
            "submit or discard those drafts before going back past this revision"
        )
    with op.batch_alter_table("evidence_uploads") as batch_op:
        batch_op.drop_column("sealed_sha256")
