"""The inbox's work queue and acknowledgements (revision 0007), on both backends: acknowledging an
event never rewrites its inbox row, every status reads as before, purge and retention cover done
events, and a database at 0006 migrates with its pending and done events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import command
from sqlalchemy import func, select

from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine
from sync_project.store.schema import inbox, inbox_done, inbox_pending

from .test_inbox import pending

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def raw_row(store: Store, event_id: int) -> tuple:
    """The inbox row as stored, with Postgres's row version (xmin): it changes on any rewrite."""
    with store.engine.connect() as conn:
        columns = [inbox.c[name] for name in inbox.c.keys()]  # noqa: SIM118 - iterating a ColumnCollection yields columns
        if conn.dialect.name == "postgresql":
            columns.append(sa.literal_column("xmin::text"))
        return tuple(conn.execute(select(*columns).where(inbox.c.id == event_id)).one())


def table_count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_acknowledging_moves_the_id_between_the_narrow_tables_and_leaves_the_inbox_row_alone(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1"), pending("e2")])
    first, second = store.inbox.events()
    before = raw_row(store, first.id)
    assert table_count(store, inbox_pending) == 2 and table_count(store, inbox_done) == 0

    with store.engine.begin() as conn:
        claimed = store.inbox.claim(conn, "acme/contacts", "c1", limit=1)
        store.inbox.mark_done(conn, [e.id for e in claimed], now=T0)

    assert raw_row(store, first.id) == before  # same bytes and, on Postgres, the same row version
    done = store.inbox.get(first.id)
    assert (done.status, done.processed_at, done.next_attempt_at) == ("done", T0, None)
    assert store.inbox.get(second.id).status == "pending"
    assert table_count(store, inbox_pending) == 1 and table_count(store, inbox_done) == 1
    assert [e.id for e in store.inbox.events(status="done")] == [first.id]
    assert [e.id for e in store.inbox.events(status="pending")] == [second.id]
    assert store.inbox.count(status="done") == 1 and store.inbox.count(status="pending") == 1
    assert store.inbox.stats().counts["done"] == 1 and store.inbox.stats().counts["pending"] == 1


def test_a_claim_hands_back_plain_rows_with_their_payload_decoded(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1")])
    with store.engine.begin() as conn:
        [event] = store.inbox.claim(conn, "acme/contacts", "c1")
    assert (event.provider, event.event_key, event.sync, event.connection_id) == ("acme", "e1", "acme/contacts", "c1")
    assert (event.account_id, event.event_type, event.payload, event.attempts) == (
        "a1",
        "contact.updated",
        {"id": "e1"},
        0,
    )


def test_a_redelivery_of_a_done_event_is_a_duplicate_and_is_not_queued_again(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1")])
    with store.engine.begin() as conn:
        store.inbox.mark_done(conn, [e.id for e in store.inbox.claim(conn, "acme/contacts", "c1")])
    again = store.inbox.receive("acme", [pending("e1")])
    assert (again.stored, again.duplicates) == (0, 1)
    assert store.inbox.due_partitions() == [] and table_count(store, inbox_pending) == 0


def test_dead_letters_leave_the_queue_and_a_replay_queues_them_again(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1")])
    [event] = store.inbox.events()
    assert store.inbox.mark_failed(event.id, "boom", max_attempts=1, now=T0) == "dead"
    assert table_count(store, inbox_pending) == 0 and store.inbox.due_partitions() == []
    assert store.inbox.mark_failed(event.id, "again", now=T0) == "dead"  # not pending: unchanged
    assert store.inbox.replay("dead", connections=store.connections) == 1
    assert [p.connection_id for p in store.inbox.due_partitions()] == ["c1"]
    with store.engine.begin() as conn:
        [claimed] = store.inbox.claim(conn, "acme/contacts", "c1")
        store.inbox.mark_done(conn, [claimed.id])
    assert store.inbox.mark_failed(event.id, "late", now=T0) == "done"


def test_purge_deletes_old_done_events_with_their_acknowledgements_and_keeps_the_rest(store: Store) -> None:
    store.inbox.receive("acme", [pending("old-done"), pending("old-pending")])
    store.inbox.receive("acme", [pending("new-done")])
    events = {e.event_key: e for e in store.inbox.events()}
    with store.engine.begin() as conn:
        old = datetime.now(timezone.utc) - timedelta(days=30)
        conn.execute(sa.update(inbox).where(inbox.c.event_key.in_(["old-done", "old-pending"])).values(received_at=old))
        store.inbox.mark_done(conn, [events["old-done"].id, events["new-done"].id])

    assert store.inbox.purge(timedelta(days=7)) == 1
    assert sorted(e.event_key for e in store.inbox.events()) == ["new-done", "old-pending"]
    with store.engine.connect() as conn:
        assert list(conn.execute(select(inbox_done.c.id)).scalars()) == [events["new-done"].id]
    assert store.inbox.purge(timedelta(days=7)) == 0  # nothing old left: one probe, nothing deleted
    assert store.inbox.count(status="pending") == 1


def test_a_database_at_0006_migrates_its_pending_and_done_events(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate.upgrade(engine, "0006")
        row = {
            "provider": "acme",
            "sync": "acme/contacts",
            "connection_id": "c1",
            "account_id": "a1",
            "event_type": "contact.updated",
            "payload": '{"id": "x"}',
            "attempts": 0,
            "received_at": T0,
        }
        with engine.begin() as conn:
            conn.execute(
                sa.insert(inbox),
                [
                    {**row, "event_key": "was-done", "status": "done", "processed_at": T0 + timedelta(seconds=5)},
                    {**row, "event_key": "was-pending", "status": "pending", "processed_at": None},
                    {**row, "event_key": "was-dead", "status": "dead", "processed_at": T0},
                ],
            )
        migrate.upgrade(engine)
        with Store(engine=engine, migrate_schema=False) as store:
            statuses = {e.event_key: (e.status, e.processed_at) for e in store.inbox.events()}
            assert statuses == {
                "was-done": ("done", T0 + timedelta(seconds=5)),
                "was-pending": ("pending", None),
                "was-dead": ("dead", T0),
            }
            with engine.begin() as conn:
                assert [e.event_key for e in store.inbox.claim(conn, "acme/contacts", "c1")] == ["was-pending"]
            assert store.inbox.receive("acme", [pending("was-done")]).duplicates == 1  # still deduplicated
        with engine.begin() as conn:
            command.downgrade(migrate._config(conn), "0006")
        with engine.connect() as conn:
            stored = dict(conn.execute(select(inbox.c.event_key, inbox.c.status)).all())
        assert stored == {"was-done": "done", "was-pending": "pending", "was-dead": "dead"}
        assert "inbox_done" not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


# -- retention ---------------------------------------------------------------------------------------


def age(store: Store, days: float, *keys: str) -> None:
    """Make these events (all, if none named) look received ``days`` ago."""
    statement = sa.update(inbox).values(received_at=datetime.now(timezone.utc) - timedelta(days=days))
    if keys:
        statement = statement.where(inbox.c.event_key.in_(keys))
    with store.engine.begin() as conn:
        conn.execute(statement)


def acknowledge(store: Store, sync: str = "acme/contacts", connection_id: str = "c1") -> None:
    with store.engine.begin() as conn:
        store.inbox.mark_done(conn, [e.id for e in store.inbox.claim(conn, sync, connection_id)])


def test_retention_never_purges_work_not_done_however_old(store: Store) -> None:
    store.connections.add("acme", "c1", account_id="a1")
    store.connections.add("acme", "gone", account_id="a2")
    store.inbox.receive(
        "acme",
        [
            pending("waiting"),
            pending("retrying"),
            pending("dead"),
            pending("orphaned", connection_id="gone"),
            pending("unroutable", connection_id=""),
        ],
    )
    by_key = {e.event_key: e for e in store.inbox.events()}
    assert store.inbox.mark_failed(by_key["retrying"].id, "boom", now=T0) == "pending"
    assert store.inbox.mark_failed(by_key["dead"].id, "boom", max_attempts=1) == "dead"
    store.connections.remove("acme", "gone")
    age(store, 365)

    assert store.inbox.purgeable(timedelta(days=1)) == 0
    assert store.inbox.purge(timedelta(days=1)) == 0
    assert {e.event_key: e.status for e in store.inbox.events()} == {
        "waiting": "pending",
        "retrying": "pending",
        "dead": "dead",
        "orphaned": "orphaned",
        "unroutable": "unroutable",
    }
    assert table_count(store, inbox_pending) == 2


def test_a_redelivery_is_a_duplicate_while_the_retention_keeps_the_event_and_is_new_work_after(
    store: Store,
) -> None:
    store.inbox.receive("acme", [pending("e1")])
    acknowledge(store)
    age(store, 6)  # inside a 7-day retention: kept, so the provider's redelivery is a duplicate
    assert store.inbox.purge(timedelta(days=7)) == 0
    again = store.inbox.receive("acme", [pending("e1")])
    assert (again.stored, again.duplicates) == (0, 1)
    assert store.inbox.due_partitions() == []

    age(store, 8)  # past it: purged, and a redelivery after that is stored and queued again
    assert store.inbox.purgeable(timedelta(days=7)) == 1
    assert store.inbox.purge(timedelta(days=7)) == 1
    late = store.inbox.receive("acme", [pending("e1")])
    assert (late.stored, late.duplicates) == (1, 0)
    assert [(e.event_key, e.status) for e in store.inbox.events()] == [("e1", "pending")]


def test_purge_goes_in_committed_chunks_and_stops_at_its_limit(store: Store) -> None:
    events = [pending(f"e{i}") for i in range(12_000)]
    for start in range(0, len(events), 4000):
        store.inbox.receive("acme", events[start : start + 4000])
    with store.engine.begin() as conn:
        store.inbox.mark_done(conn, [e.id for e in store.inbox.claim(conn, "acme/contacts", "c1", limit=12_000)])
    store.inbox.receive("acme", [pending("young")])
    acknowledge(store)
    age(store, 30, *(f"e{i}" for i in range(12_000)))

    assert store.inbox.purgeable(timedelta(days=7)) == 12_000
    assert store.inbox.purge(timedelta(days=7), limit=6000) == 10_000  # whole chunks of 5,000
    assert list(store.inbox.purge_chunks(timedelta(days=7))) == [2000]
    assert [e.event_key for e in store.inbox.events()] == ["young"]
    assert table_count(store, inbox_done) == 1
