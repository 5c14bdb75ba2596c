"""Revision 0005 (the change feed moves to feed_entries; records get HOT updates) on a database
holding records, both backends: the feed reads as before, old cursors resume, and it downgrades."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine

from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine
from sync_project.store.feed import encode_cursor
from sync_project.store.schema import records

from .helpers import CONN, NEWEST, at, contact, insert_old_records

SYNC = "crm/contacts"


def primary_key(engine: Engine) -> list[str]:
    return list(inspect(engine).get_pk_constraint("records")["constrained_columns"])


def index_names(engine: Engine) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes("records")}


def old_feed(engine: Engine, sync: str) -> list[tuple[str, object]]:
    """The feed as revision 0004 served it: the records of one (sync, connection) by (stamp, id)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(records.c.external_id, records.c.last_modified_at)
            .where(records.c.sync == sync, records.c.connection_id == CONN)
            .order_by(records.c.last_modified_at, records.c.external_id)
        ).all()
    return [(key, stamp) for key, stamp in rows]


def test_upgrading_keeps_the_feed_and_every_cursor(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0004")
        # Writes as the 0004 code made them: several records per stamp, a tombstone, two syncs.
        insert_old_records(
            engine,
            [{"sync": SYNC, "external_id": key, "last_modified_at": at(1)} for key in ("c", "a", "b")]
            + [{"sync": SYNC, "external_id": "d", "last_modified_at": at(2), "deleted_at": at(2)}]
            + [{"sync": SYNC, "external_id": key, "last_modified_at": at(3)} for key in ("f", "e")]
            + [{"sync": "other/sync", "external_id": "a", "last_modified_at": at(2)}],
        )
        before = old_feed(engine, SYNC)
        middle = encode_cursor(before[1][1], before[1][0])  # handed out by the 0004 code

        migrate.upgrade(engine)
        assert primary_key(engine) == ["sync", "connection_id", "external_id"]
        assert "ix_records_feed" not in index_names(engine)
        with Store(engine=engine, migrate_schema=False) as store:
            page = store.changes(SYNC, CONN, limit=100)
            assert [(c.id, c.last_modified_at) for c in page.records] == before
            assert [c.id for c in store.changes(SYNC, CONN, cursor=middle).records] == [k for k, _ in before[2:]]
            assert [c.id for c in store.changes("other/sync", CONN).records] == ["a"]
            # New writes stamp after the migrated ones and join the feed behind them.
            store.save(SYNC, CONN, NEWEST, [contact("a", 9)])
            news = store.changes(SYNC, CONN, cursor=page.next_cursor)
            assert [c.id for c in news.records] == ["a"] and news.records[0].last_modified_at > before[-1][1]

        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0004")
        assert primary_key(engine) == ["external_id", "sync", "connection_id"]
        assert "ix_records_feed" in index_names(engine)
        assert "feed_entries" not in inspect(engine).get_table_names()
        assert [key for key, _ in old_feed(engine, SYNC)] == ["b", "c", "d", "e", "f", "a"]
    finally:
        engine.dispose()


def test_records_leave_room_for_in_page_updates_on_postgres(postgres_url: str) -> None:
    with Store(postgres_url) as store, store.engine.connect() as conn:
        options = conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE oid = 'records'::regclass")).scalar()
    assert options is not None and "fillfactor=80" in options
