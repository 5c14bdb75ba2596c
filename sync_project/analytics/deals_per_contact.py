"""A downstream asset over the sandbox CRM: open pipeline per contact, across all connections.

It shows the consumption pattern: depend on the warehouse assets, read their tables' live rows
(``Warehouse.frame``; the same tables a data engineer queries in ``data/warehouse.duckdb``) and
compute with pandas. Soft-deleted rows are excluded by default; pass ``include_deleted=True`` to
see them. ``summarize_deals_per_contact`` takes the store's DataFrames (``Store.dataframe``) just
as well: both name the columns alike (model fields, ``_connection_id``).
"""

from typing import TYPE_CHECKING

import dagster as dg

from sync_project import registry
from sync_project.warehouse.assets import WAREHOUSE_POOL, WarehouseResource, warehouse_key

if TYPE_CHECKING:  # imported when the asset runs: every run process loads this module, few need pandas
    import pandas as pd

CONTACTS = "sandbox/contacts"
DEALS = "sandbox/deals"

#: Recomputed once a warehouse load changed the contacts or deals tables (Dagster's eager
#: condition, evaluated by the code location's automation sensor); it waits while a load of
#: either is in progress, as the DuckDB file admits no reader then.
AUTOMATION = dg.AutomationCondition.eager()


def summarize_deals_per_contact(contacts: "pd.DataFrame", deals: "pd.DataFrame") -> "pd.DataFrame":
    """One row per live contact: number of deals and their total amount (0 when none)."""
    import pandas as pd

    columns = ["connection_id", "contact_id", "email", "deals", "total_amount"]
    if contacts.empty:
        return pd.DataFrame(columns=columns)
    people = contacts.rename(columns={"_connection_id": "connection_id", "id": "contact_id"})[
        ["connection_id", "contact_id", "email"]
    ]
    if deals.empty:
        totals = pd.DataFrame(columns=["connection_id", "contact_id", "deals", "total_amount"])
    else:
        totals = (
            deals.rename(columns={"_connection_id": "connection_id"})
            .groupby(["connection_id", "contact_id"], as_index=False)
            .agg(deals=("id", "count"), total_amount=("amount", "sum"))
        )
    summary = people.merge(totals, on=["connection_id", "contact_id"], how="left")
    summary["deals"] = summary["deals"].fillna(0).astype(int)
    summary["total_amount"] = summary["total_amount"].fillna(0).astype(float)
    return summary.sort_values(["connection_id", "total_amount", "contact_id"], ascending=[True, False, True])[
        columns
    ].reset_index(drop=True)


@dg.asset(
    key=["analytics", "deals_per_contact"],
    deps=[warehouse_key(registry.get_sync(CONTACTS)), warehouse_key(registry.get_sync(DEALS))],
    group_name="analytics",
    kinds={"pandas"},
    # Reads the warehouse: the DuckDB file admits no reader while a load writes it.
    pool=WAREHOUSE_POOL,
    description="Deals and total amount per sandbox contact, from the warehouse tables (a demo of consuming synced records).",
    automation_condition=AUTOMATION,
)
def deals_per_contact(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    tables = warehouse.get_warehouse()
    summary = summarize_deals_per_contact(
        tables.frame(registry.get_sync(CONTACTS)), tables.frame(registry.get_sync(DEALS))
    )
    context.log.info(f"{len(summary)} contacts, {int(summary['deals'].sum()) if len(summary) else 0} deals")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(summary),
            "total_amount": float(summary["total_amount"].sum()) if len(summary) else 0.0,
            "preview": dg.MetadataValue.md(summary.head(10).to_markdown(index=False) if len(summary) else "(empty)"),
        }
    )
