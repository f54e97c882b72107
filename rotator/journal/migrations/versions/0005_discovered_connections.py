"""Discovery: the Makini connections enrolled as credentials, per environment.

``discovered_connections`` holds one row per connection discovery enrolled: the credential
name it was given, what Makini said of it (platform, company, name), when it was last listed,
and whether it is off-boarded (gone at Makini: no more rotations) and purged (its tokens made
unreadable once the grace passed). Names and ids only, never a token.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "discovered_connections",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("connection_id", sa.String(200), primary_key=True),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("platform", sa.String(200)),
        sa.Column("company", sa.String(200)),
        sa.Column("name", sa.String(200)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("enrolled_at", TZ, nullable=False),
        sa.Column("seen_at", TZ, nullable=False),
        sa.Column("gone_at", TZ),
        sa.Column("purged_at", TZ),
        sa.UniqueConstraint(
            "environment", "credential", name="uq_discovered_connections_credential"
        ),
    )
