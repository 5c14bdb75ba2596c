"""The warehouse table follows the store, on a real DuckDB file and a real Postgres schema.

One test per destination walks the whole life of a table (dlt pipelines take a second to start,
so the steps share a test): initial load, updates, soft deletes, a field added to the model, a
load killed after its rows were written but before its cursor was committed, a reset that removed
a connection's records, then hard deletes and a full rebuild. After every step the table's live rows equal the store's live records.

The kill is real on both. Postgres: the test holds a SHARE lock on ``_dlt_loads``, so the
worker's load writes its rows and state and then blocks on the insert that completes the load;
the test SIGKILLs the worker there (and ends its session, as a dead client's session ends). DuckDB
(one process per file): the destination refuses that insert (``_dlt_loads`` is swapped for a view),
so the load raises at the same point, in process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sync_project.core.sync import SyncDefinition
from sync_project.store import Store
from sync_project.warehouse import Warehouse, WarehouseSettings
from sync_project.warehouse.columns import table_name
from sync_project_tests.conftest import POSTGRES_URL, require_postgres
from sync_project_tests.warehouse.support import PRODUCTS, PRODUCTS_V2, live_records, normalise, now, product

CONNECTIONS = ["acme", "globex"]
DATASET = "synced"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _quiet_dlt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt"))


@dataclass
class Destination:
    settings: WarehouseSettings

    def rows(self, sync: SyncDefinition) -> list[dict[str, Any]]:
        raise NotImplementedError

    def execute(self, sql: str) -> None:
        raise NotImplementedError


@dataclass
class DuckDB(Destination):
    path: Path

    def rows(self, sync: SyncDefinition) -> list[dict[str, Any]]:
        import duckdb

        with duckdb.connect(str(self.path)) as conn:
            cursor = conn.execute(f"SELECT * FROM {DATASET}.{table_name(sync)}")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def columns(self, sync: SyncDefinition) -> dict[str, str]:
        import duckdb

        with duckdb.connect(str(self.path)) as conn:
            return {
                name: kind
                for name, kind in conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
                    [DATASET, table_name(sync)],
                ).fetchall()
            }

    def execute(self, sql: str) -> None:
        import duckdb

        with duckdb.connect(str(self.path)) as conn:
            conn.execute(sql)


@dataclass
class Postgres(Destination):
    engine: sa.Engine
    dataset: str

    def rows(self, sync: SyncDefinition) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(row._mapping)
                for row in conn.execute(sa.text(f'SELECT * FROM "{self.dataset}".{table_name(sync)}'))
            ]

    def columns(self, sync: SyncDefinition) -> dict[str, str]:
        with self.engine.connect() as conn:
            return dict(
                conn.execute(
                    sa.text(
                        "SELECT column_name, data_type FROM information_schema.columns"
                        " WHERE table_schema = :schema AND table_name = :table"
                    ),
                    {"schema": self.dataset, "table": table_name(sync)},
                ).all()
            )


@pytest.fixture
def duckdb_destination(tmp_path: Path) -> DuckDB:
    path = tmp_path / "warehouse.duckdb"
    return DuckDB(WarehouseSettings(destination="duckdb", credentials=str(path), dataset=DATASET, deletes="soft"), path)


@pytest.fixture
def postgres_destination() -> Iterator[Postgres]:
    """A dataset (schema) of the test's own on the test server; dlt adds ``<dataset>_staging``."""
    require_postgres()
    dataset = f"wh_{uuid.uuid4().hex[:12]}"
    url = sa.engine.make_url(POSTGRES_URL)
    credentials = url.set(drivername="postgresql", password=url.password or "unused-with-trust-auth", query={})
    engine = sa.create_engine(POSTGRES_URL)
    settings = WarehouseSettings(
        destination="postgres",
        credentials=credentials.render_as_string(hide_password=False),
        dataset=dataset,
        deletes="soft",
    )
    try:
        yield Postgres(settings, engine, dataset)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{dataset}" CASCADE'))
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{dataset}_staging" CASCADE'))
        engine.dispose()


def assert_table_equals_store(destination: Destination, store: Store, sync: SyncDefinition, *, soft: bool) -> None:
    """The table's live rows are the store's live records, field by field, metadata included;
    with soft deletes the other rows are exactly the store's tombstones, with their deletion time."""
    rows = destination.rows(sync)
    live = {(r["_connection_id"], r["id"]): r for r in rows if r["_deleted_at"] is None}
    expected = live_records(store, sync, CONNECTIONS)
    assert live.keys() == expected.keys()
    fields = [*sync.model.model_fields, "_first_seen_at", "_last_modified_at", "_source_updated_at"]
    for key, record in expected.items():
        assert {f: normalise(live[key][f]) for f in fields} == {f: normalise(record.get(f)) for f in fields}, key
    tombstones = {(r["_connection_id"], r["id"]): r["_deleted_at"] for r in rows if r["_deleted_at"] is not None}
    if not soft:
        assert tombstones == {}
        return
    for (connection_id, record_id), deleted_at in tombstones.items():
        change = store.get(sync.key, connection_id, record_id)
        assert change is not None and change.deleted_at is not None
        assert normalise(deleted_at) == normalise(change.deleted_at)


def test_duckdb_table_follows_the_store(tmp_path: Path, duckdb_destination: DuckDB) -> None:
    def kill_between_load_and_cursor(store: Store, warehouse: Warehouse) -> None:
        # DuckDB lets one process open the file, so the load runs here and the destination itself
        # refuses the insert that would complete it: rows and state are written, the load is not.
        duckdb_destination.execute(
            f"ALTER TABLE {DATASET}._dlt_loads RENAME TO _dlt_loads_kept;"
            f" CREATE VIEW {DATASET}._dlt_loads AS SELECT * FROM {DATASET}._dlt_loads_kept"
        )
        with pytest.raises(Exception, match="_dlt_loads"):
            warehouse.load(store, PRODUCTS_V2, "acme")
        duckdb_destination.execute(
            f"DROP VIEW {DATASET}._dlt_loads; ALTER TABLE {DATASET}._dlt_loads_kept RENAME TO _dlt_loads"
        )

    walk_the_table(tmp_path, duckdb_destination, kill_between_load_and_cursor)


def test_postgres_table_follows_the_store(tmp_path: Path, postgres_destination: Postgres) -> None:
    destination = postgres_destination
    loads = f'"{destination.dataset}"._dlt_loads'

    def kill_between_load_and_cursor(store: Store, warehouse: Warehouse) -> None:
        with destination.engine.connect() as holder:
            holder.execute(sa.text(f"LOCK TABLE {loads} IN SHARE MODE"))  # reads pass, the completing insert waits
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sync_project_tests.warehouse.support",
                    store.url,
                    destination.settings.model_dump_json(),
                    "acme",
                ],
                cwd=PROJECT_ROOT,
                env={**os.environ, "RUNTIME__LOG_LEVEL": "WARNING"},
            )
            try:
                waiting = _wait_for_lock_waiter(destination.engine, loads, worker, deadline_s=90)
                # The rows are in the table already; the state that names the new cursor is
                # written but counts only with its _dlt_loads row, which the worker never writes.
                assert any(r["price"] == 999.0 for r in destination.rows(PRODUCTS_V2))
                worker.send_signal(signal.SIGKILL)
                assert worker.wait(timeout=30) == -signal.SIGKILL
                with destination.engine.connect() as admin:  # a dead client's session ends with it
                    admin.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting})
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait(timeout=30)
            holder.rollback()

    walk_the_table(tmp_path, destination, kill_between_load_and_cursor)


def _wait_for_lock_waiter(engine: sa.Engine, table: str, worker: subprocess.Popen[bytes], *, deadline_s: float) -> int:
    """The pid of the session waiting for ``table``'s lock, within ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert worker.poll() is None, f"the worker exited ({worker.returncode}) before it reached the completing insert"
        with engine.connect() as conn:
            pid = conn.execute(
                sa.text("SELECT pid FROM pg_locks WHERE relation = CAST(:table AS regclass) AND NOT granted LIMIT 1"),
                {"table": table},
            ).scalar()
        if pid is not None:
            return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no load waited for {table} within {deadline_s} s")


def walk_the_table(tmp_path: Path, destination: Destination, kill: Any) -> None:
    with Store(f"sqlite:///{tmp_path / 'sync.db'}") as store:
        warehouse = Warehouse(destination.settings)
        spec = PRODUCTS.record_spec
        t0 = now()

        # Initial load: two connections whose ids overlap, nested models and lists as JSON.
        for connection_id in CONNECTIONS:
            store.save(PRODUCTS.key, connection_id, spec, [product(i, t0) for i in range(40)])
        for connection_id in CONNECTIONS:
            assert warehouse.load(store, PRODUCTS, connection_id).rows == 40
        assert_table_equals_store(destination, store, PRODUCTS, soft=True)
        columns = destination.columns(PRODUCTS)
        assert {columns["price"], columns["stock"]} <= {"DOUBLE", "BIGINT", "double precision", "bigint"}
        assert columns["dimensions"] in ("JSON", "jsonb") and columns["tags"] in ("JSON", "jsonb")
        assert columns["updated_at"] in ("TIMESTAMP WITH TIME ZONE", "timestamp with time zone")

        # Updates, applied in place: the next load reads only what changed.
        t1 = t0 + timedelta(minutes=1)
        store.save(PRODUCTS.key, "acme", spec, [product(i, t1, price=1.0 + i) for i in range(5)])
        result = warehouse.load(store, PRODUCTS, "acme")
        assert (result.rows, result.actions["updated"]) == (5, 5)
        assert warehouse.load(store, PRODUCTS, "globex").rows == 0
        assert_table_equals_store(destination, store, PRODUCTS, soft=True)
        assert len(destination.rows(PRODUCTS)) == 80

        # Soft deletes (the default): the rows stay, _deleted_at set.
        t2 = t1 + timedelta(minutes=1)
        store.delete(PRODUCTS.key, "acme", spec, [{"id": f"p{i:04d}", "updated_at": t2.isoformat()} for i in (1, 2, 3)])
        assert warehouse.load(store, PRODUCTS, "acme").actions["deleted"] == 3
        assert_table_equals_store(destination, store, PRODUCTS, soft=True)
        assert sum(1 for r in destination.rows(PRODUCTS) if r["_deleted_at"] is not None) == 3

        # A field added to the model becomes a column on the next load, typed from the model.
        t3 = t2 + timedelta(minutes=1)
        store.save(PRODUCTS.key, "acme", spec, [product(i, t3, region="emea") for i in range(10, 15)])
        assert warehouse.load(store, PRODUCTS_V2, "acme").rows == 5
        assert destination.columns(PRODUCTS_V2)["region"] in ("VARCHAR", "text", "character varying")
        assert_table_equals_store(destination, store, PRODUCTS_V2, soft=True)

        # A load killed after its rows were written, before its cursor was committed: the next
        # load reads the same changes again and the merge leaves one row each.
        t4 = t3 + timedelta(minutes=1)
        store.save(PRODUCTS.key, "acme", spec, [product(i, t4, price=999.0, region="apac") for i in range(20, 26)])
        kill(store, warehouse)
        resumed = warehouse.load(store, PRODUCTS_V2, "acme")
        assert resumed.rows == 6, "the killed load's cursor must not have counted"
        assert_table_equals_store(destination, store, PRODUCTS_V2, soft=True)
        assert len(destination.rows(PRODUCTS_V2)) == 80
        assert warehouse.load(store, PRODUCTS_V2, "acme").rows == 0

        # A reset that removed a connection's records from the store: the feed says so, and the
        # next load empties the table of that connection before it applies what came after.
        store.reset(PRODUCTS.key, "globex", records="remove", requested_by="test")
        t45 = t4 + timedelta(seconds=30)
        store.save(PRODUCTS.key, "globex", spec, [product(i, t45) for i in range(10)])
        emptied = warehouse.load(store, PRODUCTS_V2, "globex")
        assert (emptied.emptied_by_reset, emptied.removed, emptied.rows) == (True, 40, 10)
        assert_table_equals_store(destination, store, PRODUCTS_V2, soft=True)

        # Hard deletes by option; a full rebuild (after switching) removes the rows kept as soft
        # deletes, and leaves the other connection's rows alone.
        hard = Warehouse(destination.settings.model_copy(update={"deletes": "hard"}))
        rebuilt = hard.load(store, PRODUCTS_V2, "acme", full_rebuild=True)
        assert (rebuilt.rows, rebuilt.actions["deleted"]) == (40, 3)
        assert_table_equals_store(destination, store, PRODUCTS_V2, soft=False)
        t5 = t4 + timedelta(minutes=1)
        store.delete(PRODUCTS.key, "globex", spec, [{"id": f"p{i:04d}", "updated_at": t5.isoformat()} for i in (7, 8)])
        assert hard.load(store, PRODUCTS_V2, "globex").actions["deleted"] == 2
        assert_table_equals_store(destination, store, PRODUCTS_V2, soft=False)
        assert len(destination.rows(PRODUCTS_V2)) == 37 + 8
