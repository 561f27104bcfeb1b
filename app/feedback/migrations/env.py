"""Alembic's environment for the feedback store: always run with the connection ``app.feedback.store.upgrade``
hands over (no ini file, no URL here)."""

from __future__ import annotations

from alembic import context

from app.feedback.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
