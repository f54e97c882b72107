"""Tokens Makini may have issued that no backend holds; lease holders of any length.

``unaccounted_tokens`` records each request for a token whose answer the rotator did not live to
receive (or received after it lost the credential's lease), until it is resolved or a person
acknowledges it; ``credential_state.unaccounted`` counts a credential's open ones, and
``rotations.asked_at`` says that a request for a token is on the wire (set before asking,
cleared once the answer is recorded), so a resume knows the last attempt's answer was lost.
``locks.owner`` grows to 200 characters: a lease is held per drive, and its holder's name carries
the host, the process and the drive.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "unaccounted_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("connection_id", sa.String(200), nullable=False),
        sa.Column("rotation_id", sa.String(36)),
        sa.Column("asked_at", TZ, nullable=False),
        sa.Column("recorded_at", TZ, nullable=False),
        sa.Column("cause", sa.Text(), nullable=False),
        sa.Column("request_id", sa.String(200)),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("live_until", TZ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("closed_at", TZ),
        sa.Column("closed_by", sa.String(200)),
        sa.Column("resolution", sa.Text()),
    )
    op.create_index(
        "ix_unaccounted_tokens_open",
        "unaccounted_tokens",
        ["environment", "credential", "status"],
    )
    op.add_column("rotations", sa.Column("asked_at", TZ))
    op.add_column(
        "credential_state",
        sa.Column("unaccounted", sa.Integer(), nullable=False, server_default="0"),
    )
    with op.batch_alter_table("locks") as batch:
        batch.alter_column(
            "owner", existing_type=sa.String(100), type_=sa.String(200), existing_nullable=False
        )
