"""Shared fixtures: every store test runs on a real SQLite file and a real Postgres.

Postgres is found through ``SYNC_TEST_POSTGRES_URL`` (default: the local server, database
``test``). Each test gets a schema of its own, dropped afterwards. Outside CI, a missing server
skips the Postgres half with the reason shown; in CI (``CI=true``) it fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from sync_project.store import Store

POSTGRES_URL = os.environ.get("SYNC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _postgres_problem() -> str | None:
    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as error:  # noqa: BLE001 - any failure means "not reachable"
        return f"Postgres at {POSTGRES_URL} unreachable: {type(error).__name__}: {str(error).strip()[:200]}"


#: Modules whose tests start daemons, webservers, `sync-project dev`, Celery hosts or private
#: Postgres servers. `make test` runs on two pytest-xdist workers with ``--dist loadgroup``: these
#: share one group, so they run one at a time on one worker (two at once would starve each other's
#: deadlines on a 2-core machine) while the other worker takes the in-process tests.
HEAVY_MODULES = frozenset(
    {
        "e2e/test_backfill_while_webhooks_flow.py",
        "e2e/test_convergence.py",
        "e2e/test_scale_out_celery.py",
        "cli/test_dev.py",
        "cli/test_dev_restart.py",
        "cli/test_readme_commands.py",
        "cli/test_dagster_cli.py",
        "orchestration/test_standing_drainers.py",
        "orchestration/test_killed_run.py",
        "orchestration/test_run_monitoring.py",
        "orchestration/test_postgres_instance.py",
        "orchestration/test_handoff.py",
        "orchestration/test_partition_faults.py",
        "orchestration/test_resumable_full_refresh.py",
        "receiver/test_database_faults.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.path.dirname(__file__)
    for item in items:
        module = os.path.relpath(str(item.path), root)
        if module in HEAVY_MODULES:
            item.add_marker(pytest.mark.xdist_group("heavy"))


_PROBLEM: list[str | None] = []


def require_postgres() -> None:
    if not _PROBLEM:
        _PROBLEM.append(_postgres_problem())
    problem = _PROBLEM[0]
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI requires the Postgres suite)", pytrace=False)
        pytest.skip(problem)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose connections see only a fresh, private schema."""
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'sync.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over both backends."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    with Store(database_url) as opened:
        yield opened
