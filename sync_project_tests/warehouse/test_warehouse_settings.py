"""DuckDB's memory and thread settings reach the connection a warehouse load runs on.

DuckDB's buffers are most of a load's peak memory (``benchmarks/warehouse.py``): the cap is what
keeps that peak flat as tables grow, so the test reads the settings back from a real DuckDB
connection opened the way the load opens it (the warehouse's own dlt pipeline), after a real load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import pytest

from sync_project import settings
from sync_project.store import Store
from sync_project.warehouse import Warehouse, WarehouseSettings
from sync_project.warehouse.assets import WarehouseResource
from sync_project_tests.warehouse.support import PRODUCTS, now, product


@pytest.fixture(autouse=True)
def _quiet_dlt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt"))


def duckdb_formatted(name: str, value: object) -> str:
    """How DuckDB itself reports ``name`` once set to ``value`` (``64MB`` reads ``61.0 MiB``)."""
    with duckdb.connect(config={name: value}) as conn:
        row = conn.execute(f"SELECT current_setting('{name}')").fetchone()
    assert row is not None
    return str(row[0])


def load_connection_settings(warehouse: Warehouse) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as workdir:
        pipeline = warehouse._pipeline(workdir, "settings_probe")
        with pipeline.sql_client() as client:
            with client.execute_query(
                "SELECT current_setting('memory_limit'), current_setting('threads'),"
                " current_setting('preserve_insertion_order')"
            ) as cursor:
                memory, threads, order = cursor.fetchone()
    return {"memory_limit": str(memory), "threads": str(threads), "preserve_insertion_order": str(order)}


def test_a_load_runs_under_the_configured_duckdb_memory_limit_and_threads(tmp_path: Path) -> None:
    warehouse = Warehouse(
        WarehouseSettings(
            destination="duckdb",
            credentials=str(tmp_path / "warehouse.duckdb"),
            dataset="synced",
            duckdb_memory_limit="64MB",
            duckdb_threads=1,
        )
    )
    with Store(f"sqlite:///{tmp_path / 'sync.db'}") as store:
        store.save(PRODUCTS.key, "acme", PRODUCTS.record_spec, [product(i, now()) for i in range(500)])
        result = warehouse.load(store, PRODUCTS, "acme")
    assert result.rows == 500
    assert warehouse.live_count(PRODUCTS, "acme") == 500
    assert load_connection_settings(warehouse) == {
        "memory_limit": duckdb_formatted("memory_limit", "64MB"),
        "threads": "1",
        "preserve_insertion_order": "False",
    }


def test_the_default_caps_duckdb_memory_and_none_leaves_duckdb_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "warehouse.duckdb")
    monkeypatch.delenv(settings.WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, raising=False)
    capped = Warehouse(WarehouseSettings(destination="duckdb", credentials=path))
    assert capped.config.duckdb_memory_limit == settings.DEFAULT_WAREHOUSE_DUCKDB_MEMORY_LIMIT
    assert load_connection_settings(capped)["memory_limit"] == duckdb_formatted(
        "memory_limit", settings.DEFAULT_WAREHOUSE_DUCKDB_MEMORY_LIMIT
    )

    monkeypatch.setenv(settings.WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, "none")
    uncapped = Warehouse(WarehouseSettings(destination="duckdb", credentials=path))
    assert uncapped.config.duckdb_memory_limit is None
    with duckdb.connect() as conn:
        row = conn.execute("SELECT current_setting('memory_limit')").fetchone()
    assert row is not None
    assert load_connection_settings(uncapped)["memory_limit"] == str(row[0])


def test_the_environment_sets_duckdb_memory_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, "1GB")
    monkeypatch.setenv(settings.WAREHOUSE_DUCKDB_THREADS_ENV, "2")
    config = WarehouseSettings(destination="duckdb")
    assert config.duckdb_config() == {"preserve_insertion_order": False, "memory_limit": "1GB", "threads": 2}
    # The Dagster resource's own fields win over the environment.
    resource = WarehouseResource(destination="duckdb", duckdb_memory_limit="128MB", duckdb_threads=1)
    assert resource.get_warehouse().config.duckdb_config()["memory_limit"] == "128MB"
    assert resource.get_warehouse().config.duckdb_threads == 1


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        (settings.WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, "lots"),
        (settings.WAREHOUSE_DUCKDB_MEMORY_LIMIT_ENV, "256"),
        (settings.WAREHOUSE_DUCKDB_THREADS_ENV, "0"),
        (settings.WAREHOUSE_DUCKDB_THREADS_ENV, "two"),
    ],
)
def test_a_malformed_duckdb_setting_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, raw: str) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=name):
        WarehouseSettings(destination="duckdb")
