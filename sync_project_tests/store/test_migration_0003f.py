"""Revision 0003f on a database that already holds inbox rows, on both backends."""

from __future__ import annotations

from datetime import datetime, timezone

from alembic import command
from sqlalchemy import func, insert, inspect, select

from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine
from sync_project.store.inbox import RoutedEvent
from sync_project.store.schema import inbox


def test_upgrading_keeps_the_inbox_and_downgrading_removes_the_queue(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0002")
        # Rows as the 0002 code wrote them (today's Inbox writes the 0007 work queue too).
        with engine.begin() as conn:
            conn.execute(
                insert(inbox),
                [
                    {
                        "provider": "acme",
                        "event_key": f"e{n}",
                        "sync": "acme/contacts",
                        "connection_id": "north",
                        "event_type": "t",
                        "payload": f'{{"n": {n}}}',
                        "status": "pending",
                        "attempts": 0,
                        "received_at": datetime.now(timezone.utc),
                    }
                    for n in range(3)
                ],
            )
            before = [
                (i, k, {"n": n})
                for n, (i, k) in enumerate(conn.execute(select(inbox.c.id, inbox.c.event_key).order_by(inbox.c.id)))
            ]

        migrate.upgrade(engine)
        tables = inspect(engine)
        assert {"forwards", "forwarder_state"} <= set(tables.get_table_names())
        # The SQLite table rebuild of 0003f kept the inbox's indexes; 0007 made the status one partial.
        assert "ix_inbox_parked" in {index["name"] for index in tables.get_indexes("inbox")}
        store = Store(engine=engine, migrate_schema=False)
        assert [(e.id, e.event_key, e.payload) for e in store.inbox.events()] == before
        assert {e.status for e in store.inbox.events()} == {"pending"}
        store.inbox.receive(
            "acme",
            [RoutedEvent(event_key="e3", event_type="t", payload={}, sync="acme/contacts", connection_id="north")],
        )
        assert store.inbox.events(event_key="e3")[0].id > before[-1][0]

        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0002")
        assert "forwards" not in set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(inbox)).scalar_one() == 4
    finally:
        engine.dispose()
