"""Versioned schema: every open brings the database to the newest alembic revision.

Several processes (webserver, daemon, runs, receiver) open the store at once, so the upgrade runs
under a lock: an advisory lock on Postgres, the write lock (BEGIN IMMEDIATE) on SQLite.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from sync_project.store.engine import unavailable_as_store_error

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: Database-wide on purpose: migrations of every schema in the database take turns (they are rare).
_MIGRATION_LOCK_KEY = 7_160_337_715_541_029


def _config(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() or ""


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision``; a no-op when it is there already."""
    with unavailable_as_store_error(), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Rebuilding an index over every record may take minutes: no statement timeout here
            # (the lock timeout stays, so a migration never queues forever behind a live writer).
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        target = head_revision() if revision == "head" else revision
        if current_revision(conn) != target:
            command.upgrade(_config(conn), revision)
