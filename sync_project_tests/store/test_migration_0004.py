"""Revision 0004 (the records primary key leads with the id) on a database holding records, both backends."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine

from .helpers import CONN, NEWEST, contact

SYNC = "crm/contacts"


def primary_key(engine: Engine) -> list[str]:
    return list(inspect(engine).get_pk_constraint("records")["constrained_columns"])


def test_upgrading_reorders_the_key_and_keeps_every_record(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0003f")
        assert primary_key(engine) == ["sync", "connection_id", "external_id"]
        old = Store(engine=engine, migrate_schema=False)
        old.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1)])
        old.delete(SYNC, CONN, NEWEST, [{"id": "b", "updated_at": contact("b", 2)["updated_at"]}])
        old.save("other/sync", CONN, NEWEST, [contact("a", 5)])
        before = {(sync, key): old.get(sync, CONN, key) for sync, key in [(SYNC, "a"), (SYNC, "b"), ("other/sync", "a")]}

        migrate.upgrade(engine)
        assert primary_key(engine) == ["external_id", "sync", "connection_id"]
        store = Store(engine=engine, migrate_schema=False)
        assert {(sync, key): store.get(sync, CONN, key) for sync, key in before} == before
        # The key still refuses a second row of one record, and merges still find the stored ones.
        result = store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1), contact("c", 1)])
        assert (result.added, result.unchanged, result.skipped_stale) == (1, 1, 1)
        assert store.count(SYNC, CONN) == 2 and store.count("other/sync", CONN) == 1

        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0003f")
        assert primary_key(engine) == ["sync", "connection_id", "external_id"]
        assert Store(engine=engine, migrate_schema=False).count(SYNC, CONN) == 2
    finally:
        engine.dispose()
