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


def dagster_home() -> Path:
    """``DAGSTER_HOME``, defaulting to the project-local, git-ignored ``.dagster_home``.

    The instance config lives in the project's ``dagster.yaml`` and is copied there when missing, so
    the UI, the daemon, runs and the CLI all use one instance.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or project_root() / ".dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        template = project_root() / "dagster.yaml"
        if template.exists():
            config.write_text(template.read_text())
    return home
