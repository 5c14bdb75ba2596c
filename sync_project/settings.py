"""Where the project keeps its state, resolved from the environment in one place.

Every process (the Dagster webserver, daemon, run workers, the receiver, the CLI, tests) must agree on
the records database, so the URL is resolved here and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

DATABASE_URL_ENV = "SYNC_DATABASE_URL"
DATA_DIR_ENV = "SYNC_DATA_DIR"


def project_root() -> Path:
    """The checkout that holds pyproject.toml (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The git-ignored folder for the embedded default's files (SQLite databases, logs)."""
    path = Path(os.environ.get(DATA_DIR_ENV) or project_root() / "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """The records/inbox database: ``SYNC_DATABASE_URL``, else a SQLite file in the data folder."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    return f"sqlite:///{data_dir() / 'sync.db'}"
