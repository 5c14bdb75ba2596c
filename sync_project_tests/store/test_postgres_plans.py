"""Postgres only: page statements stay index lookups by primary key, whatever the statistics, and
merges update records in place (HOT updates), which is what keeps a change load fast."""

from __future__ import annotations

import json

from sync_project.store import Store
from sync_project.store.bulk import read_state_sql

from .helpers import CONN, NEWEST, contact

SYNC = "crm/contacts"


def plan_of_page_read(store: Store, keys: list[str]) -> str:
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.save([contact(keys[0], 2)])  # a merge: the writer looks after statistics first
        dbapi = writer.conn.connection.dbapi_connection
        assert dbapi is not None
        with dbapi.cursor() as cursor:
            cursor.execute(
                "EXPLAIN " + read_state_sql(False, False),
                {"keys": json.dumps(keys), "sync": SYNC, "connection_id": CONN},
            )
            return "\n".join(row[0] for row in cursor.fetchall())


def test_page_reads_use_the_primary_key_on_a_table_never_analyzed(postgres_url: str) -> None:
    """A first full load runs before autovacuum ever analyzed the table; with no statistics the
    planner could scan the whole sync instead of looking each key up."""
    with Store(postgres_url) as store:
        store.save(SYNC, CONN, NEWEST, [contact(f"k{i:05d}", 1) for i in range(3000)])
        plan = plan_of_page_read(store, [f"k{i:05d}" for i in range(1000, 2000)])
    assert "Index Scan using pk_records" in plan and "Seq Scan" not in plan, plan


def test_page_reads_use_the_primary_key_after_analyzing_an_empty_table(postgres_url: str) -> None:
    with Store(postgres_url) as store:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE records")  # statistics of an empty table
        store.save(SYNC, CONN, NEWEST, [contact(f"k{i:05d}", 1) for i in range(3000)])
        plan = plan_of_page_read(store, [f"k{i:05d}" for i in range(1000, 2000)])
    assert "Index Scan using pk_records" in plan and "Seq Scan" not in plan, plan


def test_merges_update_records_without_new_index_entries(postgres_url: str) -> None:
    """No index holds a column a merge changes, so updates and tombstones are heap-only (HOT) as
    long as the page has room for the new version: fillfactor 80 keeps a fifth of each page free,
    enough for a change load's share of a page's records (not for rewriting all of them at once)."""
    with Store(postgres_url) as store:
        store.save(SYNC, CONN, NEWEST, [contact(f"k{i:03d}", 1) for i in range(200)])
        with store.writer(SYNC, CONN, NEWEST) as writer:
            result = writer.save([contact(f"k{i:03d}", 2) for i in range(0, 200, 20)])
            writer.delete(
                [{"id": f"k{i:03d}", "updated_at": contact("x", 3)["updated_at"]} for i in range(10, 200, 20)]
            )
            updated, hot = writer.conn.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relname = 'records' AND schemaname = current_schema()"
            ).one()
    assert result.updated == 10
    assert updated == 20 and hot == 20
