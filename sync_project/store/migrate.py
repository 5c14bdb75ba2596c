"""Versioned schema: every open brings the database to the newest alembic revision.

Several processes (webserver, daemon, runs, receiver) open the store at once, so the upgrade runs
under a lock: an advisory lock on Postgres, the write lock (BEGIN IMMEDIATE) on SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

from sync_project.store.engine import unavailable_as_store_error

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
#: The newest revision in migrations/versions (a test checks it against alembic's head). Every
#: run process opens the store; with the schema already there it compares the stored revision
#: with this and never imports alembic (0.3 s of CPU), which only an actual upgrade needs.
HEAD_REVISION = "0010"
#: Database-wide on purpose: migrations of every schema in the database take turns (they are rare).
_MIGRATION_LOCK_KEY = 7_160_337_715_541_029


def _config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str:
    """alembic's head, read from the migration scripts."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() or ""


def current_revision(conn: Connection) -> str | None:
    """The stored revision, read as alembic does (its ``alembic_version`` table), without alembic."""
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision``; a no-op when it is there already."""
    with unavailable_as_store_error(), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Rebuilding an index over every record may take minutes: no statement timeout here
            # (the lock timeout stays, so a migration never queues forever behind a live writer).
            conn.execute(text("SET LOCAL statement_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        target = HEAD_REVISION if revision == "head" else revision
        if current_revision(conn) != target:
            from alembic import command

            command.upgrade(_config(conn), revision)
