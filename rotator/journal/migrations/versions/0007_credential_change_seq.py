"""Change tracking for readers: ``credential_state.change_seq``.

Every change of a credential's current version (a new row, or an update that changes
``current_version_id``) gives the row the next number of a journal-wide sequence, set by a
trigger, so that every writer (the engine, revoke, import, a release that does not know of this
column) is covered. A serving replica remembers the highest number it has read and asks only
for the rows above it: one indexed range query that returns nothing while nothing changes,
instead of re-reading every row.

* SQLite: the number is ``max(change_seq) + 1``, taken inside the writer's transaction (SQLite
  has one writer at a time), so numbers are committed in order.
* PostgreSQL: the number comes from a sequence (``nextval``), so concurrent transactions may
  commit out of order; the feed re-reads a recent window of numbers on its safety poll, and the
  ``NOTIFY`` of a change now names the credential (commit-ordered, exact).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_SQLITE_NEXT = """UPDATE credential_state SET change_seq =
        (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM credential_state)
    WHERE environment = NEW.environment AND credential = NEW.credential"""

_SQLITE = [
    f"""CREATE TRIGGER rotator_state_seq_insert AFTER INSERT ON credential_state
    BEGIN {_SQLITE_NEXT}; END""",
    f"""CREATE TRIGGER rotator_state_seq_update AFTER UPDATE OF current_version_id
    ON credential_state WHEN OLD.current_version_id IS NOT NEW.current_version_id
    BEGIN {_SQLITE_NEXT}; END""",
]

_PG = [
    "CREATE SEQUENCE IF NOT EXISTS credential_state_change_seq",
    """CREATE OR REPLACE FUNCTION rotator_state_seq() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR OLD.current_version_id IS DISTINCT FROM NEW.current_version_id
        THEN NEW.change_seq := nextval('credential_state_change_seq'); END IF;
        RETURN NEW;
    END $$ LANGUAGE plpgsql""",
    """CREATE OR REPLACE TRIGGER rotator_state_seq
    BEFORE INSERT OR UPDATE OF current_version_id ON credential_state
    FOR EACH ROW EXECUTE FUNCTION rotator_state_seq()""",
    # the credential in the payload: a listener reads that row alone
    """CREATE OR REPLACE FUNCTION rotator_notify_state() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR OLD.current_version_id IS DISTINCT FROM NEW.current_version_id
        THEN PERFORM pg_notify('rotator_changes',
            'credential_state ' || NEW.environment || ' ' || NEW.credential);
        END IF;
        RETURN NULL;
    END $$ LANGUAGE plpgsql""",
    """CREATE OR REPLACE TRIGGER rotator_notify_state
    AFTER INSERT OR UPDATE OF current_version_id ON credential_state
    FOR EACH ROW EXECUTE FUNCTION rotator_notify_state()""",
]


def upgrade() -> None:
    op.add_column("credential_state", sa.Column("change_seq", sa.BigInteger()))
    op.create_index("ix_credential_state_change_seq", "credential_state", ["change_seq"])
    dialect = op.get_bind().dialect.name
    for statement in _PG if dialect == "postgresql" else _SQLITE if dialect == "sqlite" else []:
        op.execute(statement)
