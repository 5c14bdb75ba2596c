"""The warehouse assets: one downstream asset per sync, ``warehouse/<provider>/<object>``.

Each has its sync's partitions (one per connection) and follows it by declarative automation:
``AutomationCondition.eager()``, except that an upstream run in progress does not hold it back. A
partition with webhook traffic has a standing drainer, a run that stays in progress for minutes
while it records a materialization per batch; plain eager would wait for that run to end. The
feed is safe to read while the sync writes (see ``sync_project.store`` feed semantics), so each
new materialization of the sync's partition requests a load of the same partition.

No `from __future__ import annotations` here: Dagster reads the config and resource types of the
asset function's parameters at definition time.
"""

from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from sync_project.orchestration.partitions import connection_partitions
from sync_project.warehouse.columns import TableLike
from sync_project.warehouse.load import LoadResult, Warehouse, WarehouseSettings

WAREHOUSE_KEY = "warehouse"
#: The Dagster pool of every step that opens the warehouse (loads and the analytics reading it):
#: the instance config limits it to one at a time (``concurrency.pools.default_limit``), as the
#: DuckDB file takes one writer process, and two merges into one table would share dlt's staging table.
WAREHOUSE_POOL = "warehouse"
#: Follow the sync: eager, without waiting for an upstream run to end (module docstring).
WAREHOUSE_AUTOMATION = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_in_progress())
AUTOMATION_SENSOR_NAME = "warehouse_automation"


class WarehouseResource(dg.ConfigurableResource):
    """Where the warehouse is. Unset fields come from the environment (``SYNC_WAREHOUSE_*``, see
    ``sync_project.settings``): by default the DuckDB file ``data/warehouse.duckdb``.

    ``credentials`` is a config reference in production (``dg.EnvVar("WAREHOUSE_CREDENTIALS")``),
    or left unset so dlt resolves them itself (``DESTINATION__POSTGRES__CREDENTIALS``,
    ``.dlt/secrets.toml``): no password sits in code.
    """

    destination: str | None = None
    credentials: str | None = None
    dataset: str | None = None
    #: ``soft`` or ``hard`` (validated by :class:`WarehouseSettings`; Dagster config has no Literal).
    deletes: str | None = None
    page_size: int | None = None
    #: DuckDB's ``memory_limit`` (``"256MB"``) and ``threads`` for the embedded destination.
    duckdb_memory_limit: str | None = None
    duckdb_threads: int | None = None

    _warehouse: Warehouse | None = PrivateAttr(default=None)

    def get_warehouse(self) -> Warehouse:
        if self._warehouse is None:
            given = {
                "destination": self.destination,
                "credentials": self.credentials,
                "dataset": self.dataset,
                "deletes": self.deletes,
                "page_size": self.page_size,
                "duckdb_memory_limit": self.duckdb_memory_limit,
                "duckdb_threads": self.duckdb_threads,
            }
            self._warehouse = Warehouse(WarehouseSettings(**{k: v for k, v in given.items() if v is not None}))
        return self._warehouse


class WarehouseRunConfig(dg.Config):
    """``full_rebuild``: read the whole change feed instead of from the stored cursor, and remove
    the partition's rows the store no longer holds (after switching to hard deletes, say)."""

    full_rebuild: bool = False


def warehouse_key(sync: TableLike) -> dg.AssetKey:
    return dg.AssetKey([WAREHOUSE_KEY, sync.provider, sync.name])


def build_warehouse_asset(sync: TableLike, *, store_key: str = "sync_store") -> dg.AssetsDefinition:
    """The warehouse asset of one model of a sync (``warehouse_tables``; a :class:`SyncDefinition`
    for its own model); it needs the ``sync_store`` and ``warehouse`` resources."""
    settings = WarehouseSettings()

    @dg.asset(
        key=warehouse_key(sync),
        deps=[dg.AssetKey([sync.provider, sync.name])],
        group_name=WAREHOUSE_KEY,
        kinds={"dlt", settings.destination},
        partitions_def=connection_partitions(sync.provider),
        automation_condition=WAREHOUSE_AUTOMATION,
        pool=WAREHOUSE_POOL,
        description=(
            f"{sync.key} as a typed table `{settings.dataset}.{sync.provider}_{sync.name}`, kept current from the "
            "store's change feed by dlt (merge on connection + primary key). Run config `full_rebuild: true` reloads it."
        ),
        metadata={"sync": sync.key, "table": f"{settings.dataset}.{sync.provider}_{sync.name}"},
        required_resource_keys={store_key, WAREHOUSE_KEY},
    )
    def _warehouse_asset(context: dg.AssetExecutionContext, config: WarehouseRunConfig) -> dg.MaterializeResult:
        store = getattr(context.resources, store_key).get_store()
        warehouse: Warehouse = getattr(context.resources, WAREHOUSE_KEY).get_warehouse()
        connection_id = context.partition_key
        result = warehouse.load(store, sync, connection_id, full_rebuild=config.full_rebuild)
        context.log.info(
            f"{warehouse.table(sync)} <- {connection_id}: {result.rows} rows from the feed"
            + (f", {result.removed} stale rows removed" if result.full_rebuild else "")
        )
        return dg.MaterializeResult(metadata=_metadata(result, warehouse.live_count(sync, connection_id)))

    return _warehouse_asset


def _metadata(result: LoadResult, live_rows: int) -> dict[str, Any]:
    return {
        "dagster/row_count": live_rows,
        "rows_loaded": result.rows,
        "added": result.actions.get("added", 0),
        "updated": result.actions.get("updated", 0),
        "deleted": result.actions.get("deleted", 0),
        "removed_by_rebuild": result.removed,
        "full_rebuild": result.full_rebuild,
        "cursor": result.cursor or "",
        "dlt_load_id": result.load_id or "",
    }


def build_warehouse_sensor(assets: list[dg.AssetsDefinition]) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the warehouse assets' automation conditions; running by default, so ``make run``
    keeps the tables current with nothing to switch on."""
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR_NAME,
        target=dg.AssetSelection.assets(*assets),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=10,
        description="Loads a warehouse partition after its sync's partition materialized (AutomationCondition.eager).",
    )
