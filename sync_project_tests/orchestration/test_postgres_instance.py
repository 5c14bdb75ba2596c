"""The production shape: Dagster's own storage on Postgres (dagster-postgres), records on Postgres."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
import yaml

from sync_project.orchestration.assets import SyncRunConfig, build_sync_asset
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.conftest import POSTGRES_URL, require_postgres
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"


def test_deploy_config_is_a_valid_postgres_instance_config():
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    assert config["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "sync/asset_partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits


def test_materialize_a_partition_on_a_postgres_backed_instance(postgres_url, monkeypatch):
    require_postgres()
    database = f"dagster_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    dagster_url = (
        sa.make_url(POSTGRES_URL).set(drivername="postgresql", database=database).render_as_string(hide_password=False)
    )
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_url)
    overrides = yaml.safe_load(DEPLOY_CONFIG.read_text())
    overrides.pop("telemetry", None)
    api = FakeApi()
    for n in range(12):
        api.put(f"i{n}", name=str(n))
    try:
        with (
            BackgroundServer(api.app()) as server,
            dg.instance_for_test(overrides=overrides) as instance,
            Store(postgres_url) as store,
        ):
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert instance.run_monitoring_enabled and "MONITORING" in instance.get_required_daemon_types()
            store.connections.add("fakeapi", "prod", config={"base_url": server.url})
            instance.add_dynamic_partitions(partitions_name("fakeapi"), ["prod"])
            result = dg.materialize(
                [build_sync_asset(ITEMS, PROVIDER)],
                partition_key="prod",
                instance=instance,
                resources={"sync_store": StoreResource(database_url=postgres_url)},
                run_config=dg.RunConfig(ops={"fakeapi__items": SyncRunConfig(mode="full")}),
            )
            assert result.success
            assert store.count(ITEMS.key, "prod") == 12
            events = instance.fetch_materializations(dg.AssetKey(["fakeapi", "items"]), limit=10).records
            assert [e.partition_key for e in events] == ["prod"]
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()
