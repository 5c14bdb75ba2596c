"""Every sync gets a warehouse asset from the factory, which follows its sync by declarative
automation and loads through Dagster with the project's resources (a real instance, a real store,
a real DuckDB file)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import pytest

from sync_project import registry
from sync_project.definitions import defs as project_defs
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.resources import StoreResource
from sync_project.store import Store
from sync_project.warehouse.assets import AUTOMATION_SENSOR_NAME, WAREHOUSE_POOL, WarehouseResource

CONTACTS = dg.AssetKey(["sandbox", "contacts"])
WAREHOUSE_CONTACTS = dg.AssetKey(["warehouse", "sandbox", "contacts"])


def test_every_sync_has_a_warehouse_asset_in_the_project() -> None:
    graph = project_defs.resolve_asset_graph()
    models = [(sync.provider, model.name) for sync in registry.syncs() for model in sync.all_models]
    assert ("github", "issue_comments") in models  # a sync of several models: a table per model
    for provider, name in models:
        node = graph.get(dg.AssetKey(["warehouse", provider, name]))
        assert node.parent_keys == {dg.AssetKey([provider, name])}
        assert node.partitions_def == graph.get(dg.AssetKey([provider, name])).partitions_def
        assert node.automation_condition is not None
        assert node.pools == {WAREHOUSE_POOL}
    sensor = project_defs.resolve_sensor_def(AUTOMATION_SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    # The demo's analytics read the warehouse tables, not the store.
    analytics = graph.get(dg.AssetKey(["analytics", "deals_per_contact"]))
    assert analytics.parent_keys == {WAREHOUSE_CONTACTS, dg.AssetKey(["warehouse", "sandbox", "deals"])}


def test_warehouse_partition_follows_its_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME__DLTHUB_TELEMETRY", "false")
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt"))
    store_url = f"sqlite:///{tmp_path / 'sync.db'}"
    warehouse_path = tmp_path / "warehouse.duckdb"
    sync = registry.get_sync("sandbox/contacts")
    defs = build_definitions(
        [sync],
        registry.providers(),
        store=StoreResource(database_url=store_url),
        warehouse=WarehouseResource(destination="duckdb", credentials=str(warehouse_path)),
    )
    contact = {
        "id": "c-1",
        "email": "ada@example.com",
        "first_name": "Ada",
        "last_name": "Lovelace",
        "updated_at": "2024-06-01T00:00:00Z",
        "created_at": "2024-05-01T00:00:00Z",
    }
    with dg.instance_for_test() as instance, Store(store_url) as store:
        instance.add_dynamic_partitions("sandbox_connections", ["acme"])
        cursor = None

        def requested() -> set[str]:
            nonlocal cursor
            result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
            cursor = result.cursor
            return set(result.get_requested_partitions(WAREHOUSE_CONTACTS))

        assert requested() == set()  # the sync's partition has never materialized
        store.save(sync.key, "acme", sync.record_spec, [contact])
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=CONTACTS, partition="acme"))
        assert requested() == {"acme"}

        result = dg.materialize(
            [defs.resolve_assets_def(WAREHOUSE_CONTACTS)],
            partition_key="acme",
            instance=instance,
            run_config={"ops": {"warehouse__sandbox__contacts": {"config": {"full_rebuild": True}}}},
        )
        assert result.success
        materialization = result.asset_materializations_for_node("warehouse__sandbox__contacts")[0]
        assert materialization.metadata["dagster/row_count"].value == 1
        assert materialization.metadata["full_rebuild"].value is True
        assert requested() == set()  # loaded: nothing new upstream

    with duckdb.connect(str(warehouse_path)) as conn:
        assert conn.execute("SELECT _connection_id, id, email FROM synced.sandbox_contacts").fetchall() == [
            ("acme", "c-1", "ada@example.com")
        ]
