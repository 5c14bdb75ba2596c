"""Loading a sync's change feed into its warehouse table through dlt, exactly once.

Each load reads the store's change feed (``Store.changes``: keyset pages in (last_modified_at, id)
order, each record at its newest version) from the cursor the last *committed* load left, and
merges the rows on (connection, primary key). The cursor lives in dlt's pipeline state, which dlt
writes into the destination as part of the same load package as the rows and counts only once
the load is complete (its ``_dlt_loads`` row, written after every table job): a load killed at
any point leaves the previous cursor in force, the next load reads those changes again, and the
merge on the primary key makes the second application of a row a no-op. So nothing is lost and
nothing is doubled.

The pipeline's working folder is a fresh temporary one per load, so the destination is the only
copy of the state: a load never resumes a half-finished package left on one worker by a killed
process (which, loaded later on top of newer rows, would write old versions back), and any host
can run the next load.

One pipeline per (sync, connection): each partition's cursor is its own. Loads into one
destination are serialised by the Dagster pool of the warehouse assets (``assets.py``): the
DuckDB file takes one writer at a time, and concurrent merges into one table would share dlt's
staging table.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from sync_project import settings
from sync_project.warehouse.columns import (
    CONNECTION_COLUMN,
    DELETED_COLUMN,
    FIRST_SEEN_COLUMN,
    LAST_ACTION_COLUMN,
    LAST_MODIFIED_COLUMN,
    METADATA_COLUMNS,
    SOURCE_UPDATED_COLUMN,
    DeleteMode,
    TableLike,
    primary_key,
    table_columns,
    table_name,
)

if TYPE_CHECKING:  # dlt and pandas cost seconds to import: only a load or a read pays for them
    import pandas as pd

    from sync_project.store import Change, Store

#: Records per feed page, one dlt item each (the feed's own maximum is 10,000).
DEFAULT_PAGE_SIZE = 5_000


class WarehouseSettings(BaseModel):
    """Where the warehouse is. ``destination`` is a dlt destination name; ``credentials`` None
    means the DuckDB file of the data folder for ``duckdb`` and dlt's own configuration (its
    environment variables or ``.dlt/secrets.toml``) for every other destination."""

    model_config = ConfigDict(frozen=True)

    destination: str = Field(default_factory=settings.warehouse_destination)
    credentials: str | None = None
    dataset: str = Field(default_factory=settings.warehouse_dataset)
    deletes: DeleteMode = Field(default_factory=settings.warehouse_deletes)  # type: ignore[arg-type]
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=1, le=10_000)
    #: dlt's file format between extract and load; None: ``parquet`` for DuckDB (its default,
    #: INSERT statements, took 4-5x the time and 4x the memory here; ``jsonl`` fails on a column
    #: absent from the first rows of a file, since dlt leaves out None values), the destination's
    #: own preference otherwise.
    loader_file_format: str | None = None
    #: DuckDB's ``memory_limit`` for the load's connection (a DuckDB size, ``"128MB"``); None:
    #: DuckDB's default, 80 % of the machine's RAM. DuckDB's buffers are most of a load's peak
    #: memory, and uncapped they grow with the rows merged (394 MB at 100k, 670 MB at 500k);
    #: capped, the merge spills to ``<file>.tmp`` and the peak stays flat.
    duckdb_memory_limit: str | None = Field(default_factory=settings.warehouse_duckdb_memory_limit)
    #: DuckDB's ``threads``; None: one per core.
    duckdb_threads: int | None = Field(default_factory=settings.warehouse_duckdb_threads, ge=1)

    def duckdb_config(self) -> dict[str, Any]:
        """The DuckDB settings of a load's connection (dlt's ``global_config``).

        ``preserve_insertion_order`` off lets DuckDB stream ``INSERT ... SELECT`` (dlt's copy of a
        parquet file, its merge out of the staging table) instead of buffering rows to keep their
        order: no table here has an order but its key's.
        """
        config: dict[str, Any] = {"preserve_insertion_order": False}
        if self.duckdb_memory_limit is not None:
            config["memory_limit"] = self.duckdb_memory_limit
        if self.duckdb_threads is not None:
            config["threads"] = self.duckdb_threads
        return config

    def file_format(self) -> str | None:
        if self.loader_file_format:
            return self.loader_file_format
        return "parquet" if self.destination == "duckdb" else None


@dataclass
class LoadResult:
    """What one load did: rows by the action the feed reported, the cursor it committed."""

    rows: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    cursor: str | None = None
    #: Rows of the connection removed because the store no longer has them (a full rebuild, a reset).
    removed: int = 0
    #: The feed said the connection's records were removed (a reset) since the last load.
    emptied_by_reset: bool = False
    load_id: str | None = None
    full_rebuild: bool = False


class Warehouse:
    """The warehouse of one destination: loads a sync's partition, reads a sync's table."""

    def __init__(self, config: WarehouseSettings | None = None) -> None:
        self.config = config or WarehouseSettings()

    # -- loading ------------------------------------------------------------------------------

    def load(self, store: Store, sync: TableLike, connection_id: str, *, full_rebuild: bool = False) -> LoadResult:
        """Bring the table's rows of ``connection_id`` up to date with the store.

        ``full_rebuild`` reads the whole feed (ignoring the stored cursor) and then removes the
        connection's rows that the load did not write: records the store no longer holds, and
        soft-deleted rows once deletes are hard.
        """
        import dlt

        result = LoadResult(full_rebuild=full_rebuild)
        with tempfile.TemporaryDirectory(prefix="sync-warehouse-") as workdir:
            pipeline = self._pipeline(workdir, pipeline_name(sync, connection_id))
            resource = dlt.resource(
                self._rows(pipeline, store, sync, connection_id, full_rebuild, result),
                name=table_name(sync),
                write_disposition="merge",
                primary_key=primary_key(sync),
                columns=table_columns(sync, self.config.deletes),
            )  # type: ignore[call-overload]  # dlt's column hints are TypedDicts; ours are plain dicts of their keys
            info = pipeline.run(resource, loader_file_format=self.config.file_format())
            info.raise_on_failed_jobs()
            if info.loads_ids:
                result.load_id = info.loads_ids[-1]
            if full_rebuild:
                result.removed = self._remove_unwritten(pipeline, sync, connection_id, result.load_id)
        return result

    def _rows(
        self,
        pipeline: Any,
        store: Store,
        sync: TableLike,
        connection_id: str,
        full_rebuild: bool,
        result: LoadResult,
    ) -> Iterator[list[dict[str, Any]]]:
        """The feed's pages from the committed cursor on, as rows; the cursor goes into the
        resource's state as each page is handed over, and dlt commits that state with the load.

        A page that says the connection's records were removed after the cursor (a reset with
        ``--remove``) first empties the table of that connection. That delete commits before the
        load does: killed in between, the next load still starts from the old cursor, hears of
        the removal again and repeats the (idempotent) delete, so no removed record survives.
        """
        import dlt

        state = dlt.current.resource_state()
        cursor = None if full_rebuild else state.get("cursor")
        while True:
            page = store.changes(sync.key, connection_id, cursor=cursor, limit=self.config.page_size)
            if page.reset is not None and not result.emptied_by_reset:
                result.removed += self._delete_connection(pipeline, sync, connection_id, keep_load_id=None)
                result.emptied_by_reset = True
            if page.records:
                rows = [_row(change) for change in page.records]
                result.rows += len(rows)
                result.actions.update(change.last_action for change in page.records)
                yield rows
            cursor = page.next_cursor
            if cursor is not None:
                state["cursor"] = cursor
            if not page.has_more:
                break
        result.cursor = cursor

    def _remove_unwritten(self, pipeline: Any, sync: TableLike, connection_id: str, load_id: str | None) -> int:
        """A rebuild wrote every row the store has for the connection: the others go. Run after
        the load committed, so a rebuild killed before this leaves extra rows, never fewer."""
        return self._delete_connection(pipeline, sync, connection_id, keep_load_id=load_id)

    def _delete_connection(
        self, pipeline: Any, sync: TableLike, connection_id: str, *, keep_load_id: str | None
    ) -> int:
        """Deletes the connection's rows (but those of ``keep_load_id``); returns how many."""
        load_id = keep_load_id
        with pipeline.sql_client() as client:
            if not client.has_dataset():
                return 0
            table = client.make_qualified_table_name(table_name(sync))
            if not _table_exists(client, table):
                return 0
            where = f"{CONNECTION_COLUMN} = %s" + (" AND _dlt_load_id <> %s" if load_id else "")
            params = (connection_id, load_id) if load_id else (connection_id,)
            with client.execute_query(f"SELECT count(*) FROM {table} WHERE {where}", *params) as cursor:
                stale = int(cursor.fetchone()[0])
            if stale:
                client.execute_sql(f"DELETE FROM {table} WHERE {where}", *params)
            return stale

    # -- reading ------------------------------------------------------------------------------

    def frame(self, sync: TableLike, *, include_deleted: bool = False) -> pd.DataFrame:
        """The sync's table (live rows unless ``include_deleted``), every connection, as a
        DataFrame; an empty one with the metadata columns before the first load."""
        import pandas as pd

        with tempfile.TemporaryDirectory(prefix="sync-warehouse-") as workdir:
            pipeline = self._pipeline(workdir, "sync_project_warehouse_reader")
            with pipeline.sql_client() as client:
                table = client.make_qualified_table_name(table_name(sync))
                if not client.has_dataset() or not _table_exists(client, table):
                    return pd.DataFrame(
                        {name: pd.Series(dtype="object") for name in (sync.primary_key, *METADATA_COLUMNS)}
                    )
                where = "" if include_deleted else f" WHERE {DELETED_COLUMN} IS NULL"
                with client.execute_query(f"SELECT * FROM {table}{where}") as cursor:
                    frame = cursor.df()
        return frame.drop(columns=[c for c in ("_dlt_load_id", "_dlt_id") if c in frame.columns])

    def table(self, sync: TableLike) -> str:
        """The sync's table as a query names it: ``dataset.table``."""
        return f"{self.config.dataset}.{table_name(sync)}"

    def live_count(self, sync: TableLike, connection_id: str) -> int:
        with tempfile.TemporaryDirectory(prefix="sync-warehouse-") as workdir:
            pipeline = self._pipeline(workdir, "sync_project_warehouse_reader")
            with pipeline.sql_client() as client:
                table = client.make_qualified_table_name(table_name(sync))
                if not client.has_dataset() or not _table_exists(client, table):
                    return 0
                with client.execute_query(
                    f"SELECT count(*) FROM {table} WHERE {CONNECTION_COLUMN} = %s AND {DELETED_COLUMN} IS NULL",
                    connection_id,
                ) as cursor:
                    return int(cursor.fetchone()[0])

    # -- the dlt pipeline ---------------------------------------------------------------------

    def _pipeline(self, workdir: str, name: str) -> Any:
        import dlt

        return dlt.pipeline(
            pipeline_name=name,
            pipelines_dir=workdir,
            destination=self._destination(),
            dataset_name=self.config.dataset,
        )

    def _destination(self) -> Any:
        import dlt

        name = self.config.destination
        if name == "duckdb":
            from dlt.destinations.impl.duckdb.configuration import DuckDbCredentials

            path = self.config.credentials or str(settings.warehouse_duckdb_path())
            return dlt.destinations.duckdb(
                credentials=DuckDbCredentials(path, global_config=self.config.duckdb_config())
            )
        if self.config.credentials:
            return dlt.destination(name, credentials=self.config.credentials)
        return dlt.destination(name)


def pipeline_name(sync: TableLike, connection_id: str) -> str:
    """One dlt pipeline (and so one state, one cursor) per (sync, connection); a digest keeps
    connection ids that differ only in characters dlt cannot name apart."""
    readable = re.sub(r"[^a-z0-9_]+", "_", f"{sync.provider}_{sync.name}_{connection_id}".lower())[:60]
    digest = hashlib.sha256(f"{sync.key}\0{connection_id}".encode()).hexdigest()[:10]
    return f"warehouse_{readable}_{digest}"


def _row(change: Change) -> dict[str, Any]:
    row = dict(change.data)
    row[CONNECTION_COLUMN] = change.connection_id
    row[LAST_ACTION_COLUMN] = change.last_action
    row[FIRST_SEEN_COLUMN] = change.first_seen_at
    row[LAST_MODIFIED_COLUMN] = change.last_modified_at
    row[SOURCE_UPDATED_COLUMN] = change.source_updated_at
    row[DELETED_COLUMN] = change.deleted_at
    return row


def _table_exists(client: Any, qualified: str) -> bool:
    try:
        with client.execute_query(f"SELECT 1 FROM {qualified} WHERE 1 = 0"):
            return True
    except Exception:  # noqa: BLE001 - dlt raises its own undefined-relation errors per destination
        return False
