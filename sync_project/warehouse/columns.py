"""A sync's warehouse table: its columns from the sync's pydantic model, plus the record metadata.

How model fields map (dlt's own mapping, ``dlt.common.libs.pydantic``):

- ``str``/``int``/``float``/``bool``/``Decimal`` -> text/bigint/double/bool/decimal;
  ``datetime``/``AwareDatetime`` -> timestamp with time zone; ``date`` -> date; enums and
  ``Literal`` -> text; a field's alias, where it has one, is its column name.
- nested models, ``dict`` and ``list`` fields -> one JSON column (DuckDB ``JSON``, Postgres
  ``jsonb``), not child tables: a record stays one row, joinable by its key, and a list that changes
  length rewrites one cell, not a child table's rows.
- ``Any`` -> inferred from the data by dlt.

Every column is nullable, whatever the model says: a tombstone of a record the store never held
has only its key, and a soft-deleted row keeps the table's other columns as they were.

The metadata columns carry the store's names with a leading underscore, as the store's DataFrames
do (``Store.dataframe``), so they can never collide with a model field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from pydantic import BaseModel

from sync_project.core.sync import SyncDefinition

DeleteMode = Literal["soft", "hard"]

CONNECTION_COLUMN = "_connection_id"
LAST_ACTION_COLUMN = "_last_action"
FIRST_SEEN_COLUMN = "_first_seen_at"
LAST_MODIFIED_COLUMN = "_last_modified_at"
SOURCE_UPDATED_COLUMN = "_source_updated_at"
DELETED_COLUMN = "_deleted_at"
METADATA_COLUMNS = (
    CONNECTION_COLUMN,
    LAST_ACTION_COLUMN,
    FIRST_SEEN_COLUMN,
    LAST_MODIFIED_COLUMN,
    SOURCE_UPDATED_COLUMN,
    DELETED_COLUMN,
)


@dataclass(frozen=True)
class WarehouseTable:
    """One model of a sync, as the warehouse sees it: its records in the store (``key``), its
    asset ``[provider, name]`` upstream, and a table of its own. A sync of several models
    (``SyncDefinition.models``) has one per model; a :class:`SyncDefinition` itself passes for
    its own model's wherever a table is asked for."""

    provider: str
    name: str
    model: type[BaseModel]
    primary_key: str = "id"

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.name}"


def warehouse_tables(sync: SyncDefinition) -> list[WarehouseTable]:
    """Every model of ``sync``: its own first, then the further ones."""
    return [WarehouseTable(sync.provider, m.name, m.model, m.primary_key) for m in sync.all_models]


TableLike = WarehouseTable | SyncDefinition


def table_name(sync: TableLike) -> str:
    """``provider_object``: one table per sync, every connection's records in it."""
    return f"{sync.provider}_{sync.name}"


def primary_key(sync: TableLike) -> list[str]:
    """The merge key: the connection and the sync's primary key (two accounts can share ids)."""
    return [CONNECTION_COLUMN, sync.primary_key]


def model_columns(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """The model's fields as dlt column schemas, every one nullable (see the module docstring)."""
    from dlt.common.libs.pydantic import pydantic_to_table_schema_columns

    columns = {name: {**column, "nullable": True} for name, column in pydantic_to_table_schema_columns(model).items()}
    for name, data_type in _pydantic_time_types(model).items():
        if name in columns:
            columns[name]["data_type"] = data_type
    return columns


def _pydantic_time_types(model: type[BaseModel]) -> dict[str, str]:
    """dlt maps ``datetime`` but not pydantic's constrained ones (``AwareDatetime``, which every
    sync's timestamp uses, ``PastDate``, ...): unknown types become text. Columns of those are
    timestamps and dates here."""
    import pydantic
    from dlt.common.typing import extract_inner_type, get_args, is_union_type

    kinds = {
        pydantic.AwareDatetime: "timestamp",
        pydantic.NaiveDatetime: "timestamp",
        pydantic.PastDatetime: "timestamp",
        pydantic.FutureDatetime: "timestamp",
        pydantic.PastDate: "date",
        pydantic.FutureDate: "date",
    }
    found: dict[str, str] = {}
    for field_name, field in model.model_fields.items():
        # pydantic types an annotation as a type form; dlt's helper takes (and handles) any.
        inner = extract_inner_type(cast(type, field.annotation))
        if is_union_type(inner):
            inner = extract_inner_type(get_args(inner)[0])
        if inner in kinds:
            found[field.alias or field_name] = kinds[inner]
    return found


def table_columns(sync: TableLike, deletes: DeleteMode) -> dict[str, dict[str, Any]]:
    """The model's columns and the metadata columns, with the hints the merge needs.

    ``_last_modified_at`` sorts duplicates: the change feed may list a record twice in one load
    (it changed while the load paged), and the newest copy must win the merge. With hard deletes,
    a row whose ``_deleted_at`` is set deletes the table's row instead of being written.
    """
    columns = model_columns(sync.model)
    key = sync.primary_key
    columns[key] = {**columns.get(key, {"name": key, "data_type": "text"}), "nullable": False}
    columns[CONNECTION_COLUMN] = {"name": CONNECTION_COLUMN, "data_type": "text", "nullable": False}
    columns[LAST_ACTION_COLUMN] = {"name": LAST_ACTION_COLUMN, "data_type": "text", "nullable": False}
    columns[FIRST_SEEN_COLUMN] = {"name": FIRST_SEEN_COLUMN, "data_type": "timestamp", "nullable": False}
    columns[LAST_MODIFIED_COLUMN] = {
        "name": LAST_MODIFIED_COLUMN,
        "data_type": "timestamp",
        "nullable": False,
        "dedup_sort": "desc",
    }
    columns[SOURCE_UPDATED_COLUMN] = {"name": SOURCE_UPDATED_COLUMN, "data_type": "timestamp", "nullable": True}
    columns[DELETED_COLUMN] = {"name": DELETED_COLUMN, "data_type": "timestamp", "nullable": True}
    if deletes == "hard":
        columns[DELETED_COLUMN]["hard_delete"] = True
    return columns
