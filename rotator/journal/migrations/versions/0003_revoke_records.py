"""An emergency revoke's decisions in a table of their own: ``revoke_records``, one row each.

A revoke kept its decisions (strategy, method, what it superseded, adopted, disconnected,
replaced) as a ``"revoke-record "``-prefixed JSON note in its row's ``rotations.notes``. The
last such note of an existing row becomes its row in ``revoke_records`` (an open revoke resumes
with the same decisions after the upgrade), and every such note leaves the notes list; the
other notes stay as they were.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
PREFIX = "revoke-record "
FIELDS = (
    "strategy",
    "method",
    "escalate",
    "replace",
    "target_stage",
    "current_version",
    "superseded",
    "adopted",
    "disconnected",
    "replaced",
)
DEFAULTS: dict[str, Any] = {
    "strategy": "auto",
    "method": "issue",
    "escalate": False,
    "replace": True,
    "target_stage": None,
    "current_version": None,
    "superseded": [],
    "adopted": None,
    "disconnected": False,
    "replaced": None,
}


def upgrade() -> None:
    records = op.create_table(
        "revoke_records",
        sa.Column("rotation_id", sa.String(36), primary_key=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("escalate", sa.Boolean(), nullable=False),
        sa.Column("replace", sa.Boolean(), nullable=False),
        sa.Column("target_stage", sa.String(16)),
        sa.Column("current_version", sa.String(36)),
        sa.Column("superseded", sa.Text(), nullable=False),
        sa.Column("adopted", sa.String(36)),
        sa.Column("disconnected", sa.Boolean(), nullable=False),
        sa.Column("replaced", sa.String(36)),
        sa.Column("updated_at", TZ, nullable=False),
    )
    _move_notes(records)


def _move_notes(records: sa.Table) -> None:
    bind = op.get_bind()
    rotations = sa.table(
        "rotations",
        sa.column("id", sa.String()),
        sa.column("environment", sa.String()),
        sa.column("credential", sa.String()),
        sa.column("updated_at", TZ),
        sa.column("notes", sa.Text()),
    )
    found = bind.execute(
        sa.select(rotations).where(rotations.c.notes.like(f"%{PREFIX}%"))
    ).all()
    for row in found:
        notes = json.loads(row.notes or "[]")
        kept: list[Any] = []
        moved: list[dict[str, Any]] = []
        for note in notes:
            if isinstance(note, str) and note.startswith(PREFIX):
                moved.append(_columns(json.loads(note.removeprefix(PREFIX))))
            else:
                kept.append(note)
        if not moved:
            continue
        bind.execute(
            records.insert().values(
                rotation_id=row.id,
                environment=row.environment,
                credential=row.credential,
                updated_at=row.updated_at,
                **moved[-1],
            )
        )
        bind.execute(
            rotations.update().where(rotations.c.id == row.id).values(notes=json.dumps(kept))
        )


def _columns(data: dict[str, Any]) -> dict[str, Any]:
    values = {name: data.get(name, DEFAULTS[name]) for name in FIELDS}
    values["superseded"] = json.dumps(values["superseded"] or [], separators=(",", ":"))
    return values
