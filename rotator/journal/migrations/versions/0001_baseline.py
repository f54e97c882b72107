"""The journal as the first releases created it, table by table.

Journals created before the schema had migrations already hold some or all of these tables (the
serving tables were created on first use): each is created only where it is missing, so such a
journal is adopted as it is, then stamped.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)

# On PostgreSQL, changes that replicas must hear of at once NOTIFY the channel their feeds
# LISTEN on (rotator.api.feed).
_PG_NOTIFY = [
    """CREATE OR REPLACE FUNCTION rotator_notify_change() RETURNS trigger AS $$
    BEGIN PERFORM pg_notify('rotator_changes', TG_TABLE_NAME); RETURN NULL; END
    $$ LANGUAGE plpgsql""",
    """CREATE OR REPLACE TRIGGER rotator_notify_state
    AFTER INSERT OR UPDATE OF current_version_id ON credential_state
    FOR EACH ROW EXECUTE FUNCTION rotator_notify_change()""",
    """CREATE OR REPLACE TRIGGER rotator_notify_drops AFTER INSERT ON token_drops
    FOR EACH ROW EXECUTE FUNCTION rotator_notify_change()""",
    """CREATE OR REPLACE TRIGGER rotator_notify_keys AFTER INSERT OR UPDATE ON reader_keys
    FOR EACH ROW EXECUTE FUNCTION rotator_notify_change()""",
]


def _rotations() -> None:
    op.create_table(
        "rotations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("version_id", sa.String(36), nullable=False),
        sa.Column("old_version_id", sa.String(36)),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("old_fingerprint", sa.String(64)),
        sa.Column("sealed", sa.LargeBinary()),
        sa.Column("expires_at", TZ),
        sa.Column("retire_after", TZ),
        sa.Column("invalidated_old", sa.Boolean()),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("started_at", TZ, nullable=False),
        sa.Column("updated_at", TZ, nullable=False),
        sa.Column("finished_at", TZ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("notes", sa.Text(), nullable=False),
    )


def _credential_state() -> None:
    op.create_table(
        "credential_state",
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("credential", sa.String(64), primary_key=True),
        sa.Column("current_version_id", sa.String(36)),
        sa.Column("current_fingerprint", sa.String(64)),
        sa.Column("expires_at", TZ),
        sa.Column("rotated_at", TZ),
        sa.Column("last_attempt_at", TZ),
        sa.Column("last_outcome", sa.String(32)),
        sa.Column("last_error", sa.Text()),
        sa.Column("attention", sa.Text()),
    )


def _audit() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", TZ, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("environment", sa.String(64)),
        sa.Column("credential", sa.String(64)),
        sa.Column("version_id", sa.String(36)),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("request_ids", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )


def _locks() -> None:
    op.create_table(
        "locks",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("acquired_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )


def _reader_keys() -> None:
    op.create_table(
        "reader_keys",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("credentials", sa.Text()),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("revoked_at", TZ),
        sa.Column("changed_at", TZ, nullable=False),
    )


def _reader_reads() -> None:
    op.create_table(
        "reader_reads",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("environment", sa.String(64), primary_key=True),
        sa.Column("credential", sa.String(64), primary_key=True),
        sa.Column("version_id", sa.String(36), primary_key=True),
        sa.Column("key_name", sa.String(100), nullable=False),
        sa.Column("first_at", TZ, nullable=False),
        sa.Column("last_at", TZ, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    )


def _webhook_events() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("webhook_id", sa.String(200), nullable=False),
        sa.Column("event_type", sa.String(200), nullable=False),
        sa.Column("connection_id", sa.String(200)),
        sa.Column("occurred_at", TZ),
        sa.Column("received_at", TZ, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claimed_at", TZ),
        sa.Column("processed_at", TZ),
        sa.Column("outcome", sa.Text()),
        sa.UniqueConstraint("environment", "webhook_id", name="uq_webhook_id"),
    )


def _token_drops() -> None:
    op.create_table(
        "token_drops",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("credential", sa.String(64), nullable=False),
        sa.Column("version_id", sa.String(36), nullable=False),
        sa.Column("at", TZ, nullable=False),
    )


TABLES: dict[str, Callable[[], None]] = {
    "rotations": _rotations,
    "credential_state": _credential_state,
    "audit": _audit,
    "locks": _locks,
    "reader_keys": _reader_keys,
    "reader_reads": _reader_reads,
    "webhook_events": _webhook_events,
    "token_drops": _token_drops,
}

INDEXES: dict[str, tuple[str, list[str]]] = {
    "ix_rotations_environment": ("rotations", ["environment"]),
    "ix_rotations_credential": ("rotations", ["credential"]),
    "ix_rotations_step": ("rotations", ["step"]),
    "ix_rotations_credential_started": ("rotations", ["environment", "credential", "started_at"]),
    "ix_audit_at": ("audit", ["at"]),
    "ix_audit_environment": ("audit", ["environment"]),
    "ix_reader_keys_changed_at": ("reader_keys", ["changed_at"]),
    "ix_reader_keys_name": ("reader_keys", ["name"]),
    "ix_reader_keys_environment": ("reader_keys", ["environment"]),
    "ix_reader_reads_last_at": ("reader_reads", ["last_at"]),
    "ix_webhook_events_environment": ("webhook_events", ["environment"]),
    "ix_webhook_events_status": ("webhook_events", ["status"]),
}


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for name, create in TABLES.items():
        if name not in existing:
            create()
    indexed = {
        index["name"]
        for table in {t for t, _ in INDEXES.values()}
        for index in sa.inspect(bind).get_indexes(table)
    }
    for name, (table, columns) in INDEXES.items():
        if name not in indexed:
            op.create_index(name, table, columns)
    if bind.dialect.name == "postgresql":
        for statement in _PG_NOTIFY:
            op.execute(statement)
