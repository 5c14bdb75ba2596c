"""Routing: account id -> connections, event type -> subscribed syncs, one inbox row per pair."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from sync_project.core import InboundEvent
from sync_project.receiver.routing import InvalidEventError, route, subscribers_from
from sync_project.store import Store
from sync_project.store.routing import ConnectionSnapshot
from sync_project_tests.webhook_support import audit_sync, contacts_sync

SUBSCRIBERS = subscribers_from([contacts_sync(), audit_sync()])


def inbound(key: str, event_type: str = "contact.updated", account: object = "acct-1") -> InboundEvent:
    return InboundEvent(event_key=key, event_type=event_type, account_id=account, payload={"id": key})  # type: ignore[arg-type]


def rows(routed: list) -> list[tuple[str, str, str, str]]:
    return sorted((r.event_key, r.sync, r.connection_id, r.status) for r in routed)


def test_an_account_routes_to_its_connections_and_each_subscribed_sync(store: Store) -> None:
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south", account_id="acct-1")
    store.connections.add("acme", "east", account_id="acct-2")
    store.connections.add("other", "west", account_id="acct-1")
    routed = route("acme", [inbound("e1", "contact.created")], store.connections, subscribers=SUBSCRIBERS)
    assert rows(routed) == [
        ("e1", "acme/audit", "north", "pending"),
        ("e1", "acme/audit", "south", "pending"),
        ("e1", "acme/contacts", "north", "pending"),
        ("e1", "acme/contacts", "south", "pending"),
    ]


def test_an_event_naming_no_account_goes_to_every_connection_of_the_provider(store: Store) -> None:
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south")
    store.connections.add("other", "west")
    routed = route("acme", [inbound("e1", account=None)], store.connections, subscribers=SUBSCRIBERS)
    assert rows(routed) == [("e1", "acme/contacts", "north", "pending"), ("e1", "acme/contacts", "south", "pending")]


def test_a_paused_connection_still_receives(store: Store) -> None:
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.set_status("acme", "north", "paused")
    assert rows(route("acme", [inbound("e1")], store.connections, subscribers=SUBSCRIBERS)) == [
        ("e1", "acme/contacts", "north", "pending")
    ]


def test_no_connection_gives_one_unroutable_row_per_subscribed_sync(store: Store) -> None:
    routed = route("acme", [inbound("e1", "contact.created", "acct-404")], store.connections, subscribers=SUBSCRIBERS)
    assert rows(routed) == [("e1", "acme/audit", "", "unroutable"), ("e1", "acme/contacts", "", "unroutable")]
    assert {r.account_id for r in routed} == {"acct-404"}


def test_no_subscriber_gives_one_ignored_row(store: Store) -> None:
    store.connections.add("acme", "north", account_id="acct-1")
    routed = route("acme", [inbound("e1", "invoice.paid")], store.connections, subscribers=SUBSCRIBERS)
    assert rows(routed) == [("e1", "", "", "ignored")]


def test_numeric_ids_are_routed_as_text(store: Store) -> None:
    store.connections.add("acme", "north", account_id="62515")
    routed = route(
        "acme",
        [InboundEvent(event_key=987, event_type="contact.updated", account_id=62515, payload={})],
        store.connections,
        subscribers=SUBSCRIBERS,
    )  # type: ignore[arg-type]
    assert rows(routed) == [("987", "acme/contacts", "north", "pending")]


@pytest.mark.parametrize(
    "event, message",
    [
        (inbound("k" * 300), "event_key"),
        (inbound("e1", account={"id": 1}), "account id is a dict"),
        (
            InboundEvent(event_key="e1", event_type="contact.updated", account_id=None, payload={"x": {1, 2}}),
            "payload is not JSON",
        ),  # type: ignore[dict-item]
    ],
)
def test_an_event_the_inbox_cannot_hold_is_refused_as_malformed(
    store: Store, event: InboundEvent, message: str
) -> None:
    with pytest.raises(InvalidEventError, match=message):
        route("acme", [event], store.connections, subscribers=SUBSCRIBERS)


def test_a_snapshot_routes_exactly_like_the_live_connections(store: Store) -> None:
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south")
    store.connections.add("acme", "east", account_id="acct-2")
    events = [
        inbound("e1"),
        inbound("e2", account=None),
        inbound("e3", account="acct-2"),
        inbound("e4", account="nope"),
    ]
    with store.engine.begin() as conn:
        snapshot = ConnectionSnapshot.load(conn, {("acme", e.account_id) for e in events})
    live = route("acme", events, store.connections, subscribers=SUBSCRIBERS)
    assert rows(route("acme", events, snapshot, subscribers=SUBSCRIBERS)) == rows(live)
    assert len(live) == 6  # north; north, south, east; east; unroutable


def test_the_receivers_writer_routes_from_a_kept_snapshot_and_sees_new_connections_at_once(store: Store) -> None:
    from sync_project.receiver.writer import Delivery, InboxWriter, RoutingCache

    store.connections.add("acme", "north", account_id="acct-1")
    writer = InboxWriter(store, SUBSCRIBERS)
    try:
        for n in range(20):  # twenty batches, one read of the connections table
            [result] = writer([Delivery("acme", (inbound(f"e{n}"),))])
            assert result.stored == 1  # contact.updated: the contacts sync only
        assert writer.routing.loads == 1

        store.connections.add("acme", "east", account_id="acct-2")  # added a moment before its first event
        writer([Delivery("acme", (inbound("new", account="acct-2"),))])
        assert {(e.connection_id, e.status) for e in store.inbox.events(event_key="new")} == {("east", "pending")}
        writer([Delivery("acme", (inbound("lost", account="acct-404"),))])  # no connection: looked up, not reloaded
        assert {e.status for e in store.inbox.events(event_key="lost")} == {"unroutable"}
        assert writer.routing.loads == 2

        # A removal is seen at the next check (here: every batch).
        writer.routing = RoutingCache(store.connections, check_interval_s=0.0)
        writer([Delivery("acme", (inbound("before"),))])
        store.connections.remove("acme", "north")
        writer([Delivery("acme", (inbound("after"),))])
        # Pending when its connection went: orphaned with it (kept, pending again if it comes back).
        assert {e.status for e in store.inbox.events(event_key="before")} == {"orphaned"}
        assert {e.status for e in store.inbox.events(event_key="after")} == {"unroutable"}

        # A change the revision cannot see (SQL by hand, outside the store) is seen once the
        # snapshot is max_age_s old.
        store.connections.add("acme", "west", account_id="acct-3")
        stale = RoutingCache(store.connections, check_interval_s=0.0, max_age_s=3600.0)
        aged = RoutingCache(store.connections, check_interval_s=0.0, max_age_s=0.0)
        for cache, key in ((stale, "w1"), (aged, "w2")):  # both read the table now
            writer.routing = cache
            writer([Delivery("acme", (inbound(key, account="acct-3"),))])
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE connections SET account_id = 'acct-4' WHERE connection_id = 'west'"))
        writer.routing = stale
        writer([Delivery("acme", (inbound("w3", account="acct-3"),))])
        assert {e.connection_id for e in store.inbox.events(event_key="w3")} == {"west"}  # not seen
        writer.routing = aged
        writer([Delivery("acme", (inbound("w4", account="acct-3"),))])
        assert {e.status for e in store.inbox.events(event_key="w4")} == {"unroutable"}
    finally:
        writer.close()


def test_a_connection_re_pointed_from_a_host_whose_clock_is_behind_is_seen_at_the_next_check(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removed and added back under another account, both written an hour in the past: the count
    of connections and their newest ``updated_at`` stay as they were, the table's revision moves."""
    from datetime import timedelta

    from sync_project.core.clock import utcnow
    from sync_project.receiver.writer import Delivery, InboxWriter, RoutingCache
    from sync_project.store import connections as connections_module
    from sync_project.store.schema import connections

    def count_and_newest() -> tuple[Any, ...]:
        with store.engine.connect() as conn:
            return tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(connections.c.updated_at))).one())

    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south", account_id="acct-9")  # the newest updated_at
    writer = InboxWriter(store, SUBSCRIBERS)
    writer.routing = RoutingCache(store.connections, check_interval_s=0.0, max_age_s=3600.0)
    try:
        writer([Delivery("acme", (inbound("before"),))])
        assert {e.connection_id for e in store.inbox.events(event_key="before")} == {"north"}

        before = count_and_newest()
        behind = utcnow() - timedelta(hours=1)
        monkeypatch.setattr(connections_module, "utcnow", lambda: behind)
        store.connections.remove("acme", "north")
        store.connections.add("acme", "north", account_id="acct-2")
        assert count_and_newest() == before  # only the revision tells

        writer([Delivery("acme", (inbound("after"),))])  # acct-1 has no connection now
        assert {e.status for e in store.inbox.events(event_key="after")} == {"unroutable"}
        assert writer.routing.loads == 2
    finally:
        writer.close()


def test_each_write_of_a_connection_moves_the_revision_once_and_a_failed_one_not_at_all(store: Store) -> None:
    from sync_project.store import UnknownConnectionError

    def revision() -> int:
        with store.engine.connect() as conn:
            return store.connections.version(conn)

    start = revision()
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.configure("acme", "north")  # nothing to change: no write
    assert revision() == start + 1
    store.connections.set_status("acme", "north", "paused")
    store.connections.configure("acme", "north", poll_interval_s=600)
    store.connections.remove("acme", "north")
    assert revision() == start + 4
    with pytest.raises(UnknownConnectionError):
        store.connections.set_status("acme", "north", "active")
    with pytest.raises(UnknownConnectionError):
        store.connections.remove("acme", "north")
    assert revision() == start + 4


def test_a_batch_rolled_back_to_break_a_deadlock_is_committed_again(postgres_url: str) -> None:
    """Two transactions inserting the same event keys in opposite orders (with several writers: a
    redelivery racing its original) deadlock, and Postgres rolls one back. The writer's batch is
    the victim here (its deadlock_timeout expires first); it runs again and is stored, not 503."""
    import threading

    from sync_project.receiver.writer import Delivery, InboxWriter
    from sync_project.store.inbox import RoutedEvent, insert_events

    def routed(key: str) -> RoutedEvent:
        return RoutedEvent(
            event_key=key, event_type="contact.updated", account_id="acct-1", payload={"id": key},
            sync="acme/contacts", connection_id="north",
        )  # fmt: skip

    with Store(postgres_url) as store:
        store.connections.add("acme", "north", account_id="acct-1")

        # Postgres checks a lock wait for a deadlock once, deadlock_timeout after it began: the
        # writer's check must come after the test has closed the cycle, which takes a while on a
        # loaded machine (1 s, the default, was not always enough).
        @sa.event.listens_for(store.engine, "connect")
        def _late_deadlock_check(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET deadlock_timeout = '5s'")
            dbapi_connection.commit()  # a SET rolled back with its transaction would not hold

        store.engine.dispose()  # the pooled connections predate the listener
        writer = InboxWriter(store, SUBSCRIBERS)
        other = store.engine.connect()
        try:
            other.exec_driver_sql("SET deadlock_timeout = '60s'")  # so the writer is the victim
            other_pid = other.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            other.commit()
            other.begin()
            insert_events(other, [("acme", [routed("k2")])])
            outcome: list[object] = []
            batch = [Delivery("acme", (inbound("k1"),)), Delivery("acme", (inbound("k2"),))]
            thread = threading.Thread(target=lambda: outcome.append(writer(batch)))
            thread.start()

            def writer_waits_for_other() -> bool:
                with store.engine.connect() as probe:
                    blocked = sa.text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))")
                    return bool(probe.execute(blocked, {"pid": other_pid}).scalar_one())

            while not writer_waits_for_other():  # the writer has k1 and waits for k2
                assert thread.is_alive(), outcome
                threading.Event().wait(0.05)
            insert_events(other, [("acme", [routed("k1")])])  # a cycle: the writer is rolled back
            other.rollback()  # the writer's second attempt now takes both keys
            thread.join(60)
            assert not thread.is_alive()
            [results] = outcome
            assert [(r.stored, r.duplicates) for r in results] == [(1, 0), (1, 0)]  # type: ignore[union-attr, attr-defined]
            assert {e.event_key for e in store.inbox.events()} == {"k1", "k2"}
        finally:
            other.close()
            writer.close()
