"""Schema versions: a database at the previous revision (0001) migrates on open with its data,
the migrated schema is exactly ``schema.metadata``, and opening is safe twice and concurrently."""

from __future__ import annotations

import multiprocessing
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from sync_project.store import MergeStrategy, RecordSpec, Store, migrate
from sync_project.store.schema import metadata

from . import workers

FIXTURES = Path(__file__).parent / "fixtures"
SPEC = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
UTC = timezone.utc


@pytest.fixture(params=["sqlite", "postgres"])
def url_at_0001(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database at revision 0001 holding the rows of fixtures/make_fixtures.py."""
    if request.param == "sqlite":
        copy = tmp_path / "old.db"
        shutil.copy(FIXTURES / "store_0001.sqlite", copy)
        return f"sqlite:///{copy}"
    url: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        conn.connection.dbapi_connection.cursor().execute((FIXTURES / "store_0001_postgres.sql").read_text())
    engine.dispose()
    return url


def revision(url: str) -> str | None:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        current = migrate.current_revision(conn)
    engine.dispose()
    return current


def test_fixture_is_at_the_previous_revision(url_at_0001: str) -> None:
    assert revision(url_at_0001) == "0001"
    assert migrate.head_revision() != "0001"
    engine = sa.create_engine(url_at_0001)
    columns = {column["name"] for column in sa.inspect(engine).get_columns("records")}
    engine.dispose()
    assert "seen_by_run" not in columns


def test_opening_an_old_database_migrates_it_and_keeps_its_data(url_at_0001: str) -> None:
    with Store(url_at_0001) as store:
        a = store.get("crm/contacts", "acme", "a")
        b = store.get("crm/contacts", "acme", "b")
        issue = store.get("gh/issues", "acme", "7")
        connection = store.connections.get("crm", "acme")
        state = store.state.get("crm/contacts", "acme")

        assert a is not None and a.data == {"id": "a", "name": "Ada", "updated_at": "2024-01-01T09:00:00+00:00"}
        assert a.source_updated_at == datetime(2024, 1, 1, 9, tzinfo=UTC)
        assert a.last_modified_at == datetime(2024, 1, 1, 10, 0, 0, 1, tzinfo=UTC)
        assert b is not None and b.deleted_at == datetime(2024, 1, 3, 8, tzinfo=UTC) and b.last_action == "deleted"
        assert issue is not None and issue.source_updated_at is None and issue.data["title"] == "Crash"
        assert connection.account_id == "portal-1" and connection.config == {"region": "eu"}
        assert state is not None and state.checkpoint == {"cursor": "p2"} and state.last_run_id == "run-41"

        # The old rows merge like new ones: same content is unchanged, the tombstone holds, and
        # the column 0002 added (delete detection) works on them.
        again = store.save("crm/contacts", "acme", SPEC, [a.data])
        stale = store.save(
            "crm/contacts", "acme", SPEC, [{"id": "b", "name": "Bob", "updated_at": "2024-01-01T09:00:00Z"}]
        )
        with store.writer("crm/contacts", "acme", SPEC) as writer:
            writer.save([a.data], seen_by_run="run-42")
            removed = writer.delete_unseen("run-42", datetime.now(UTC))
        assert again.unchanged == 1 and stale.skipped_stale == 1 and removed == 0

    assert revision(url_at_0001) == migrate.head_revision()


def test_migrated_schema_matches_the_metadata(url_at_0001: str, database_url: str) -> None:
    """From 0001 and from nothing, the migrations end at exactly the tables schema.py declares."""
    for url in (url_at_0001, database_url):
        Store(url).close()
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), metadata)
        engine.dispose()
        assert differences == [], url


def test_opening_twice_is_a_no_op(database_url: str) -> None:
    with Store(database_url) as store:
        store.save("crm/contacts", "acme", SPEC, [{"id": "a", "updated_at": "2024-01-01T00:00:00Z"}])
    with Store(database_url) as store:
        assert store.count("crm/contacts") == 1
    assert revision(database_url) == migrate.head_revision()


def test_processes_opening_a_new_database_at_once_are_safe(database_url: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Event(), spawn.Queue()
    processes = [spawn.Process(target=workers.open_store, args=(database_url, start, results)) for _ in range(3)]
    for process in processes:
        process.start()
    start.set()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    assert outcomes == [("ok", 0)] * 3
    assert revision(database_url) == migrate.head_revision()


def test_the_pinned_head_is_alembics_head() -> None:
    # Opening a store compares the stored revision with HEAD_REVISION, so a run never imports
    # alembic: a new migration must move it, or stores would not be upgraded.
    assert migrate.HEAD_REVISION == migrate.head_revision()
