"""Revision 0003f on a database that already holds inbox rows, on both backends."""

from __future__ import annotations

from alembic import command
from sqlalchemy import inspect

from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine
from sync_project.store.inbox import RoutedEvent


def test_upgrading_keeps_the_inbox_and_downgrading_removes_the_queue(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0002")
        old = Store(engine=engine, migrate_schema=False)
        old.inbox.receive("acme", [RoutedEvent(event_key=f"e{n}", event_type="t", payload={"n": n},
                                               sync="acme/contacts", connection_id="north") for n in range(3)])
        before = [(e.id, e.event_key, e.payload) for e in old.inbox.events()]

        migrate.upgrade(engine)
        tables = inspect(engine)
        assert {"forwards", "forwarder_state"} <= set(tables.get_table_names())
        assert "ix_inbox_claim" in {index["name"] for index in tables.get_indexes("inbox")}
        store = Store(engine=engine, migrate_schema=False)
        assert [(e.id, e.event_key, e.payload) for e in store.inbox.events()] == before
        store.inbox.receive("acme", [RoutedEvent(event_key="e3", event_type="t", payload={}, sync="acme/contacts",
                                                 connection_id="north")])
        assert store.inbox.events(event_key="e3")[0].id > before[-1][0]

        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0002")
        assert "forwards" not in set(inspect(engine).get_table_names())
        assert len(Store(engine=engine, migrate_schema=False).inbox.events()) == 4
    finally:
        engine.dispose()
