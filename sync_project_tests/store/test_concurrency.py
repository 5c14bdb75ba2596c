"""Writers in separate processes: batches of one (sync, connection) never interleave, and batches
of different connections run side by side (Postgres). Leases across processes: test_leases.py."""

from __future__ import annotations

import itertools
import multiprocessing
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from sync_project.store import Store
from sync_project.store.records import RecordWriter
from sync_project_tests.conftest import POSTGRES_URL

from . import workers

SPAWN = multiprocessing.get_context("spawn")


def run_all(processes: list[Any]) -> None:
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"


def drain(results: Any, count: int) -> list[Any]:
    return [results.get(timeout=60) for _ in range(count)]


def test_writers_of_one_connection_never_interleave(database_url: str) -> None:
    Store(database_url).close()  # migrate once, so the children only write
    start, results = SPAWN.Event(), SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=workers.write_batches, args=(database_url, "acme", label, 3, 0.15, start, results), name=label
        )
        for label in ("first", "second")
    ]
    for process in processes:
        process.start()
    start.set()
    reports = dict(drain(results, 2))
    for process in processes:
        process.join(60)
        assert process.exitcode == 0

    intervals = sorted(interval for label in reports for interval in reports[label])
    assert len(intervals) == 6
    for (_, ended), (began, _) in itertools.pairwise(intervals):
        assert began >= ended, f"two batches held the lock at once: {intervals}"
    with Store(database_url) as store:
        assert store.count(workers.SYNC, "acme") == 7  # 3 + 3 own rows and the shared one


def test_writers_of_different_connections_run_in_parallel(postgres_url: str) -> None:
    """Both processes must be inside their writer transactions at the same time for the barrier
    to open: if one connection's lock blocked the other, both would report being alone."""
    Store(postgres_url).close()
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    run_all(
        [
            SPAWN.Process(target=workers.meet_inside_writer, args=(postgres_url, connection, barrier, results))
            for connection in ("acme", "globex")
        ]
    )
    assert sorted(drain(results, 2)) == [("acme", "met"), ("globex", "met")]


def test_reads_do_not_wait_for_a_writer(store: Store) -> None:
    """A merge holds its transaction for a whole page; connection lookups (webhook routing),
    sync state and feed reads must not queue behind it (on SQLite they would wait for the
    database write lock, up to the busy timeout, and then fail)."""
    store.connections.add("crm", "acme", account_id="portal-1")
    with store.writer(workers.SYNC, "acme", workers.NEWEST) as writer:
        writer.save([workers.contact("a", 1)])
        assert [c.connection_id for c in store.connections.for_account("crm", "portal-1")] == ["acme"]
        assert store.connections.get("crm", "acme").account_id == "portal-1"
        assert [c.connection_id for c in store.connections.list()] == ["acme"]
        assert store.state.get(workers.SYNC, "acme") is None
        assert store.count(workers.SYNC) == 0  # the writer has not committed yet
    assert store.count(workers.SYNC) == 1


@pytest.fixture
def other_postgres_url(postgres_url: str) -> Iterator[str]:
    """A second private schema in the same database as ``postgres_url``."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_stores_in_two_schemas_of_one_database_do_not_share_locks(postgres_url: str, other_postgres_url: str) -> None:
    """Advisory locks are database-wide: keyed by names alone, a staging store would block the
    production store's writers (its leases are rows of its own schema)."""
    with Store(postgres_url) as one, Store(other_postgres_url) as other:
        with (
            one.leases.hold(workers.SYNC, "acme", "poll", "run-1"),
            other.leases.hold(workers.SYNC, "acme", "poll", "run-1"),
        ):
            with one.writer(workers.SYNC, "acme", workers.NEWEST) as first:
                first.save([workers.contact("a", 1)])
                # Would wait forever for the first writer's batch lock if the keys were shared.
                with other.engine.connect() as conn:
                    conn.exec_driver_sql("SET lock_timeout = '5s'")
                    conn.commit()
                    with conn.begin():
                        RecordWriter(conn, workers.SYNC, "acme", workers.NEWEST).save([workers.contact("a", 2)])
        assert one.get(workers.SYNC, "acme", "a").data["version"] == 1  # type: ignore[union-attr]
        assert other.get(workers.SYNC, "acme", "a").data["version"] == 2  # type: ignore[union-attr]
