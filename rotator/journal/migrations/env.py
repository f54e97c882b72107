"""Alembic's entry point for the journal's migrations.

The rotator runs migrations itself (``rotator.journal.migrate``), on a connection it has already
opened, locked and put in a transaction; it hands that connection over in ``config.attributes``.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
