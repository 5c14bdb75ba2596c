"""The data engineer's warehouse: every sync as a typed table, kept current from the change feed.

provider -> store (records, change feed) -> warehouse (one table per sync, loaded by dlt).

``load.py`` reads the feed and merges it through dlt exactly once; ``columns.py`` turns a sync's
model into the table's columns; ``assets.py`` makes one downstream Dagster asset per sync. A sync
module declares nothing for it: every registered sync gets its warehouse asset.
"""

from sync_project.warehouse.load import LoadResult, Warehouse, WarehouseSettings

__all__ = ["LoadResult", "Warehouse", "WarehouseSettings"]
