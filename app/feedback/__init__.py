"""Clinicians' feedback: the store (SQLite or PostgreSQL, Alembic migrations) and what training reads from it."""
