"""Syncs and helpers the warehouse tests share; also a worker run as a subprocess (``python -m``)
that loads one partition, so a test can SIGKILL a load for real.

Two versions of one sync: ``PRODUCTS_V2`` adds a field to the model, as a sync module edited
between two deploys would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from pydantic import AwareDatetime, BaseModel

from sync_project.core.sync import FetchContext, Page, SyncDefinition
from sync_project.store import Store


class Dimensions(BaseModel):
    width_cm: float
    height_cm: float


class Product(BaseModel):
    id: str
    name: str
    price: float
    stock: int
    active: bool
    tags: list[str] = []
    dimensions: Dimensions | None = None
    updated_at: AwareDatetime


class ProductV2(Product):
    #: The field added between two deploys: a column on the next load.
    region: str | None = None


def _no_fetch(ctx: FetchContext) -> Iterator[Page]:
    return iter(())


PRODUCTS = SyncDefinition(provider="shop", name="products", model=Product, fetch=_no_fetch, updated_field="updated_at")
PRODUCTS_V2 = SyncDefinition(
    provider="shop", name="products", model=ProductV2, fetch=_no_fetch, updated_field="updated_at"
)


def product(index: int, at: datetime, *, price: float | None = None, region: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": f"p{index:04d}",
        "name": f"product {index}",
        "price": price if price is not None else 10.0 + index,
        "stock": index * 3,
        "active": index % 2 == 0,
        "tags": [f"t{index % 3}", "all"],
        "dimensions": {"width_cm": 1.5 * index, "height_cm": 2.0} if index % 4 else None,
        "updated_at": at.isoformat(),
    }
    if region is not None:
        record["region"] = region
    return record


def now() -> datetime:
    return datetime.now(timezone.utc)


def live_records(
    store: Store, sync: SyncDefinition, connection_ids: list[str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """The store's live records, read through the change feed: (connection, id) -> fields + metadata."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for connection_id in connection_ids:
        cursor = None
        while True:
            page = store.changes(sync.key, connection_id, cursor=cursor, limit=1000)
            for change in page.records:
                if change.deleted_at is None:
                    found[(connection_id, change.id)] = {
                        **change.data,
                        "_first_seen_at": change.first_seen_at,
                        "_last_modified_at": change.last_modified_at,
                        "_source_updated_at": change.source_updated_at,
                    }
                else:
                    found.pop((connection_id, change.id), None)
            cursor = page.next_cursor
            if not page.has_more:
                break
    return found


def normalise(value: Any) -> Any:
    """One form for what the destinations return and what the store holds: JSON text parsed,
    timestamps as aware datetimes, ISO timestamps parsed."""
    if isinstance(value, str):
        if value[:1] in "[{":
            return normalise(json.loads(value))
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        return parsed if parsed.tzinfo else value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    """``python -m sync_project_tests.warehouse.support STORE_URL SETTINGS_JSON CONNECTION``:
    load one partition of PRODUCTS_V2 (the test kills it midway)."""
    from sync_project.warehouse import Warehouse, WarehouseSettings

    store_url, settings_json, connection_id = argv
    with Store(store_url, migrate_schema=False) as store:
        Warehouse(WarehouseSettings.model_validate_json(settings_json)).load(store, PRODUCTS_V2, connection_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
