"""Jobs' files: a content-addressed store of blobs (a snapshot's files, outputs,
checkpoints and the manifests naming them), their bytes in chunks when the store is the
database, and what each attempt saved.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from chiffon.persistence.models import UTCDateTime

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "job_files",
        sa.Column("job_id", sa.Uuid(), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("manifest", sa.String(64), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("saved_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "agent_snapshots",
        sa.Column("agent_id", sa.Uuid(), primary_key=True),
        sa.Column("manifest", sa.String(64), primary_key=True),
        sa.Column("fetched_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_agent_snapshots_manifest", "agent_snapshots", ["manifest"])


def downgrade() -> None:
    op.drop_table("agent_snapshots")
    op.drop_table("job_files")
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
