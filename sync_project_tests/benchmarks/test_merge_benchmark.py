"""merge.py's baseline table: a copy of the store's records table, however the migrations left it."""

from __future__ import annotations

import merge
import sqlalchemy as sa

from sync_project.store import Store


def test_the_bare_table_copies_the_migrated_records_table(database_url: str) -> None:
    # On SQLite a migration that rebuilt the table stores its name quoted; the copy must still work.
    with Store(database_url) as store:
        merge.create_bare_table(store.engine)
        inspector = sa.inspect(store.engine)

        def shape(table: str) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
            columns = [column["name"] for column in inspector.get_columns(table)]
            key = list(inspector.get_pk_constraint(table)["constrained_columns"])
            indexes = sorted(tuple(index["column_names"]) for index in inspector.get_indexes(table))
            return columns, key, indexes

        assert shape("bare_records") == shape("records")
        assert shape("records")[1] == ["sync", "connection_id", "external_id"]
        if store.backend == "postgresql":
            with store.engine.connect() as conn:
                options = conn.exec_driver_sql(
                    # By oid: this schema's tables, not another schema's of the same names.
                    "SELECT relname, reloptions FROM pg_class WHERE oid IN ('records'::regclass, 'bare_records'::regclass)"
                ).all()
            assert {name: tuple(opts) for name, opts in options} == {
                "records": ("fillfactor=80",),
                "bare_records": ("fillfactor=80",),
            }
