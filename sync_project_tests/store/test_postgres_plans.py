"""Postgres only: page statements stay index lookups by primary key, whatever the statistics."""

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
                "EXPLAIN " + read_state_sql(False, False), {"keys": json.dumps(keys), "sync": SYNC, "connection_id": CONN}
            )
            return "\n".join(row[0] for row in cursor.fetchall())


def test_page_reads_use_the_primary_key_on_a_table_never_analyzed(postgres_url: str) -> None:
    """A first full load runs before autovacuum ever analyzed the table; with no statistics the
    planner could look keys up through the feed index, scanning the whole sync per key."""
    with Store(postgres_url) as store:
        store.save(SYNC, CONN, NEWEST, [contact(f"k{i:05d}", 1) for i in range(3000)])
        plan = plan_of_page_read(store, [f"k{i:05d}" for i in range(1000, 2000)])
    assert "pk_records" in plan, plan
    assert "ix_records_feed" not in plan and "Seq Scan on records" not in plan, plan


def test_page_reads_use_the_primary_key_after_analyzing_an_empty_table(postgres_url: str) -> None:
    with Store(postgres_url) as store:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE records")  # statistics of an empty table
        store.save(SYNC, CONN, NEWEST, [contact(f"k{i:05d}", 1) for i in range(3000)])
        plan = plan_of_page_read(store, [f"k{i:05d}" for i in range(1000, 2000)])
    assert "pk_records" in plan and "ix_records_feed" not in plan, plan
