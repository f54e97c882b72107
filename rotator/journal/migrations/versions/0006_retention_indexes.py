"""Retention: indexes that let the pruner find old history without reading every row.

``rotations.finished_at`` (written once, when a rotation or revoke finishes; the hot path's
step updates do not touch it) and ``webhook_events.received_at``. The audit log's ``at`` is
indexed since the baseline.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_rotations_finished_at", "rotations", ["finished_at"])
    op.create_index("ix_webhook_events_received_at", "webhook_events", ["received_at"])
