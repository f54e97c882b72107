"""Notifications: which conditions are on, and the queue of notifications to deliver.

``notify_conditions`` holds, per environment, credential and condition, whether the condition
someone must act on is on (a notification when it turns on, one when it turns off);
``notify_outbox`` holds each notification for each sink until it is delivered.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "notify_conditions",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("credential", sa.String(64), primary_key=True),
        sa.Column("condition", sa.String(32), primary_key=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("resolved_at", TZ),
    )
    op.create_table(
        "notify_outbox",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("condition", sa.String(32), nullable=False),
        sa.Column("sink", sa.String(32), nullable=False),
        sa.Column("firing", sa.Boolean(), nullable=False),
        sa.Column("notice", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("next_at", TZ, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claimed_until", TZ),
        sa.Column("delivered_at", TZ),
        sa.Column("last_error", sa.Text()),
    )
    op.create_index("ix_notify_outbox_due", "notify_outbox", ["status", "next_at"])
    op.create_index("ix_notify_outbox_delivered_at", "notify_outbox", ["delivered_at"])
