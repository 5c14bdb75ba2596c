"""The forwarding queue on both backends: what it makes of the inbox, gaps, retries, dead letters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, insert

from sync_project.store import Store
from sync_project.store.forwards import Forwards
from sync_project.store.inbox import RoutedEvent
from sync_project.store.schema import inbox


def routed(
    key: str,
    connection_id: str = "north",
    sync: str = "acme/contacts",
    account: str | None = "acct-1",
    event_type: str = "contact.updated",
) -> RoutedEvent:
    return RoutedEvent(
        event_key=key,
        event_type=event_type,
        account_id=account,
        payload={"id": key},
        sync=sync,
        connection_id=connection_id,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keyed(forwards: Forwards) -> set[tuple[str, str]]:
    return {(f.event_key, f.connection_id) for f in forwards.list()}


def test_one_forward_per_event_and_connection_whatever_the_fan_out(store: Store):
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south", account_id="acct-1")
    forwards = Forwards(store.engine)
    assert forwards.enqueue(start_at="beginning") == 0
    store.inbox.receive(
        "acme",
        [
            routed("e1", "north"),
            routed("e1", "south"),
            routed("e1", "north", sync="acme/audit"),  # 2 syncs x 2 connections
            routed("e2", "north"),
        ],
    )
    assert forwards.enqueue() == 3
    assert keyed(forwards) == {("e1", "north"), ("e1", "south"), ("e2", "north")}
    [first] = [f for f in forwards.list() if f.event_key == "e2"]
    assert (first.provider, first.payload, first.status, first.attempts) == ("acme", {"id": "e2"}, "pending", 0)
    assert forwards.enqueue() == 0  # nothing new, nothing twice


def test_ignored_events_are_routed_now_and_unroutable_ones_once_replayed(store: Store):
    store.connections.add("acme", "north", account_id="acct-1")
    forwards = Forwards(store.engine)
    forwards.enqueue()
    store.inbox.receive(
        "acme",
        [
            RoutedEvent(event_key="i1", event_type="invoice.paid", account_id="acct-1", payload={}),  # no sync wants it
            RoutedEvent(event_key="i2", event_type="invoice.paid", account_id="nobody", payload={}),
            routed("u1", connection_id="", account="acct-2"),  # no connection has acct-2 yet
        ],
    )
    forwards.enqueue()
    assert keyed(forwards) == {("i1", "north"), ("i2", "")}

    store.connections.add("acme", "west", account_id="acct-2")
    assert store.inbox.replay("unroutable", connections=store.connections) == 1
    forwards.enqueue()
    assert keyed(forwards) == {("i1", "north"), ("i2", ""), ("u1", "west")}


def test_forwarding_starts_now_unless_asked_to_start_from_the_beginning(store: Store):
    store.inbox.receive("acme", [routed("old")])
    now = Forwards(store.engine)
    now.enqueue()
    assert keyed(now) == set()
    store.inbox.receive("acme", [routed("new")])
    now.enqueue()
    assert keyed(now) == {("new", "north")}
    assert now.stats().inbox_cursor == max(e.id for e in store.inbox.events())


def test_forwarding_from_the_beginning_forwards_what_the_inbox_holds(store: Store):
    store.inbox.receive("acme", [routed("old")])
    forwards = Forwards(store.engine)
    forwards.enqueue(start_at="beginning")
    assert keyed(forwards) == {("old", "north")}


def test_ids_freed_by_a_purge_are_never_handed_out_again(store: Store):
    forwards = Forwards(store.engine)
    forwards.enqueue(start_at="beginning")
    store.inbox.receive("acme", [routed("a"), routed("b"), routed("c")])
    forwards.enqueue()
    newest = max(e.id for e in store.inbox.events())
    with store.engine.begin() as conn:  # what `inbox purge` does to old, finished rows
        conn.execute(delete(inbox).where(inbox.c.id >= newest - 1))
    store.inbox.receive("acme", [routed("d")])
    assert store.inbox.events(event_key="d")[0].id > newest
    forwards.enqueue()
    assert ("d", "north") in keyed(forwards)


def test_a_gap_holds_the_cursor_until_it_settles(store: Store):
    clock = Clock()
    forwards = Forwards(store.engine, settle_s=30, clock=clock)
    forwards.enqueue(start_at="beginning")
    store.inbox.receive("acme", [routed("a")])
    forwards.enqueue()
    base = forwards.stats().inbox_cursor
    # Ids base+1 and base+2 are taken by transactions still in flight; base+3 is committed.
    with store.engine.begin() as conn:
        conn.execute(
            insert(inbox).values(
                id=base + 3,
                provider="acme",
                event_key="late-1",
                sync="acme/contacts",
                connection_id="north",
                event_type="t",
                payload="{}",
                status="pending",
                attempts=0,
                received_at=datetime.now(timezone.utc),
            )
        )
    forwards.enqueue()
    assert ("late-1", "north") in keyed(forwards)
    assert forwards.stats().inbox_cursor == base and forwards.open_gaps == 1
    # One of them commits: forwarded from the gap, not lost behind the cursor.
    with store.engine.begin() as conn:
        conn.execute(
            insert(inbox).values(
                id=base + 1,
                provider="acme",
                event_key="late-0",
                sync="acme/contacts",
                connection_id="north",
                event_type="t",
                payload="{}",
                status="pending",
                attempts=0,
                received_at=datetime.now(timezone.utc),
            )
        )
    clock.now = 10
    forwards.enqueue()
    assert ("late-0", "north") in keyed(forwards)
    assert forwards.stats().inbox_cursor == base
    # The other never commits (a rollback, or ON CONFLICT used the id up): the gap settles.
    clock.now = 31
    forwards.enqueue()
    assert forwards.stats().inbox_cursor == base + 3 and forwards.open_gaps == 0


def test_postgres_out_of_order_commits_are_not_skipped(postgres_url: str):
    with Store(postgres_url) as store:
        forwards = Forwards(store.engine, settle_s=3600)
        forwards.enqueue()
        slow = store.engine.connect()
        transaction = slow.begin()
        slow.execute(
            insert(inbox).values(
                provider="acme",
                event_key="slow",
                sync="acme/contacts",
                connection_id="north",
                event_type="t",
                payload="{}",
                status="pending",
                attempts=0,
                received_at=datetime.now(timezone.utc),
            )
        )
        store.inbox.receive("acme", [routed("fast")])  # a later id, committed first
        forwards.enqueue()
        assert keyed(forwards) == {("fast", "north")}
        transaction.commit()
        slow.close()
        forwards.enqueue()
        assert keyed(forwards) == {("fast", "north"), ("slow", "north")}


def test_another_forwarder_moving_the_cursor_is_followed_without_loss(store: Store):
    one, two = Forwards(store.engine), Forwards(store.engine)
    one.enqueue(start_at="beginning")
    store.inbox.receive("acme", [routed("a")])
    two.enqueue()
    store.inbox.receive("acme", [routed("b")])
    one.enqueue()
    assert keyed(one) == {("a", "north"), ("b", "north")}


def test_claims_lease_failures_back_off_and_die_after_max_attempts(store: Store):
    forwards = Forwards(store.engine)
    forwards.enqueue(start_at="beginning")
    store.inbox.receive("acme", [routed("a"), routed("b")])
    forwards.enqueue()
    t0 = datetime.now(timezone.utc)
    claimed = forwards.claim(now=t0, lease_s=60)
    assert [f.event_key for f in claimed] == ["a", "b"]
    assert forwards.claim(now=t0 + timedelta(seconds=30)) == []  # leased
    forwards.mark_delivered(claimed[1].id, now=t0)
    assert forwards.mark_failed(claimed[0].id, "HTTP 503", max_attempts=3, base_delay_s=10, now=t0) == "pending"
    assert forwards.claim(now=t0 + timedelta(seconds=9)) == []
    [again] = forwards.claim(now=t0 + timedelta(seconds=10))
    assert (again.attempts, again.last_error) == (1, "HTTP 503")
    assert forwards.mark_failed(again.id, "HTTP 503", max_attempts=3, base_delay_s=10, now=t0) == "pending"
    assert forwards.mark_failed(again.id, "HTTP 500", max_attempts=3, base_delay_s=10, now=t0) == "dead"
    stats = forwards.stats()
    assert stats.counts == {"pending": 0, "delivered": 1, "dead": 1}
    assert forwards.replay_dead() == 1
    [replayed] = forwards.claim(now=t0)
    assert (replayed.attempts, replayed.status) == (0, "pending")


def test_purge_drops_only_old_delivered_forwards(store: Store):
    forwards = Forwards(store.engine)
    forwards.enqueue(start_at="beginning")
    store.inbox.receive("acme", [routed("a"), routed("b")])
    forwards.enqueue(now=datetime.now(timezone.utc) - timedelta(days=10))
    [a, b] = forwards.claim()
    forwards.mark_delivered(a.id)
    assert forwards.purge(timedelta(days=7)) == 1
    assert [f.event_key for f in forwards.list()] == ["b"]
    with pytest.raises(ValueError):
        forwards.purge(timedelta(0))


@pytest.mark.parametrize("bad", [{"limit": 0}, {"start_at": "yesterday"}])
def test_bad_enqueue_arguments_are_refused(store: Store, bad):
    with pytest.raises(ValueError):
        Forwards(store.engine).enqueue(**bad)
