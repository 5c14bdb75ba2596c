"""The inbox table's semantics on both backends: dedupe, due partitions, claim, retries, replay."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from sync_project.store import Store
from sync_project.store.inbox import RoutedEvent, retry_delay
from sync_project.store.schema import inbox

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def pending(
    key: str, connection_id: str = "c1", sync: str = "acme/contacts", account: str | None = "a1"
) -> RoutedEvent:
    return RoutedEvent(
        event_key=key,
        event_type="contact.updated",
        account_id=account,
        payload={"id": key},
        sync=sync,
        connection_id=connection_id,
    )


def ids_of(events: list) -> list[str]:
    return [e.event_key for e in events]


# -- receive ---------------------------------------------------------------------------------------


def test_receive_stores_each_row_once_and_counts_duplicates(store: Store) -> None:
    first = store.inbox.receive("acme", [pending("e1"), pending("e2")])
    again = store.inbox.receive("acme", [pending("e2"), pending("e3")])
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (1, 1)
    assert ids_of(store.inbox.events()) == ["e1", "e2", "e3"]
    assert {e.status for e in store.inbox.events()} == {"pending"}


def test_the_same_event_key_is_distinct_per_provider_sync_and_connection(store: Store) -> None:
    result = store.inbox.receive(
        "acme", [pending("e1"), pending("e1", connection_id="c2"), pending("e1", sync="acme/audit")]
    )
    other = store.inbox.receive("other", [pending("e1")])
    assert (result.stored, other.stored) == (3, 1)
    assert store.inbox.count() == 4


def test_receive_many_attributes_a_shared_row_to_the_first_delivery(store: Store) -> None:
    results = store.inbox.receive_many([("acme", [pending("e1")]), ("acme", [pending("e1"), pending("e2")])])
    assert [(r.stored, r.duplicates) for r in results] == [(1, 0), (1, 1)]
    assert store.inbox.count() == 2


def test_a_repeated_event_inside_one_delivery_is_stored_once(store: Store) -> None:
    result = store.inbox.receive("acme", [pending("e1"), pending("e1")])
    assert (result.stored, result.duplicates) == (1, 1)


def test_unroutable_and_ignored_rows_keep_their_payload(store: Store) -> None:
    store.inbox.receive(
        "acme",
        [
            RoutedEvent(
                event_key="u1",
                event_type="contact.updated",
                account_id="nobody",
                payload={"x": 1},
                sync="acme/contacts",
            ),
            RoutedEvent(event_key="i1", event_type="ping", account_id=None, payload={"y": [1, 2]}),
        ],
    )
    unroutable, ignored = store.inbox.events()
    assert (unroutable.status, unroutable.connection_id, unroutable.payload) == ("unroutable", "", {"x": 1})
    assert (ignored.status, ignored.sync, ignored.payload) == ("ignored", "", {"y": [1, 2]})
    assert store.inbox.due_partitions() == []


def test_routed_event_status_follows_the_routing() -> None:
    assert pending("e").status == "pending"
    assert RoutedEvent(event_key="e", event_type="t", payload={}, sync="s").status == "unroutable"
    assert RoutedEvent(event_key="e", event_type="t", payload={}).status == "ignored"
    with pytest.raises(ValueError, match="contradicts the routing"):
        RoutedEvent(event_key="e", event_type="t", payload={}, sync="s", status="pending")


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"event_key": ""}, "at least 1 character"),
        ({"event_key": "k" * 256}, "at most 255 characters"),
        ({"event_key": "a\x00b"}, "NUL"),
        ({"account_id": "x" * 256}, "at most 255 characters"),
        ({"payload": {"n": float("nan")}}, "payload is not JSON"),
        ({"payload": {"when": datetime(2030, 1, 1)}}, "payload is not JSON"),
        ({"payload": ["not", "an", "object"]}, "payload: a JSON object is required"),
        ({"event_key": 7}, "event_key: text is required"),
        ({"sync": "s" * 129, "connection_id": "c"}, "sync: should have at most 128 characters"),
    ],
)
def test_routed_event_refuses_what_the_table_cannot_hold(bad: dict, message: str) -> None:
    values = {"event_key": "e", "event_type": "t", "payload": {}, **bad}
    with pytest.raises(ValueError, match=message):
        RoutedEvent(**values)


# -- sensor reads ----------------------------------------------------------------------------------


def test_due_partitions_group_pending_events_oldest_first(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1", "c2"), pending("e2", "c1"), pending("e3", "c2")])
    store.inbox.receive("acme", [pending("e4", "c1", sync="acme/audit")])
    partitions = store.inbox.due_partitions()
    by_id = {e.event_key: e.id for e in store.inbox.events()}
    assert [(p.sync, p.connection_id, p.max_id, p.pending, p.attempts) for p in partitions] == [
        ("acme/contacts", "c2", by_id["e3"], 2, 0),
        ("acme/contacts", "c1", by_id["e2"], 1, 0),
        ("acme/audit", "c1", by_id["e4"], 1, 0),
    ]
    assert len(store.inbox.due_partitions(limit=2)) == 2
    assert store.inbox.high_water_mark() == by_id["e4"]


def test_high_water_mark_of_an_empty_inbox_is_zero(store: Store) -> None:
    assert store.inbox.high_water_mark() == 0


def test_a_failed_event_is_due_again_only_after_its_backoff(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1"), pending("e2", "c2")])
    e1 = store.inbox.events(event_key="e1")[0]
    assert store.inbox.mark_failed(e1.id, "boom", now=T0) == "pending"
    assert [p.connection_id for p in store.inbox.due_partitions(now=T0)] == ["c2"]
    later = T0 + retry_delay(1)
    due = store.inbox.due_partitions(now=later)
    assert [(p.connection_id, p.attempts) for p in due] == [("c1", 1), ("c2", 0)]


# -- claim and acknowledge ---------------------------------------------------------------------------


def test_claim_returns_the_partitions_due_events_in_order_and_mark_done_commits_with_the_caller(store: Store) -> None:
    store.inbox.receive("acme", [pending(f"e{i}") for i in range(5)] + [pending("x", "c2")])
    with store.engine.begin() as conn:
        claimed = store.inbox.claim(conn, "acme/contacts", "c1", limit=3)
        assert ids_of(claimed) == ["e0", "e1", "e2"]
        assert claimed[0].payload == {"id": "e0"} and claimed[0].attempts == 0
        store.inbox.mark_done(conn, [e.id for e in claimed])
    statuses = {e.event_key: e.status for e in store.inbox.events()}
    assert statuses == {"e0": "done", "e1": "done", "e2": "done", "e3": "pending", "e4": "pending", "x": "pending"}
    done = store.inbox.events(status="done")
    assert all(e.processed_at is not None for e in done)


def test_a_rolled_back_transaction_leaves_claimed_events_pending(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1"), pending("e2")])
    with pytest.raises(RuntimeError), store.engine.begin() as conn:
        claimed = store.inbox.claim(conn, "acme/contacts", "c1")
        store.inbox.mark_done(conn, [e.id for e in claimed])
        raise RuntimeError("the run died before its commit")
    assert {e.status for e in store.inbox.events()} == {"pending"}


def test_claim_skips_events_waiting_for_their_retry(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1"), pending("e2")])
    store.inbox.mark_failed(store.inbox.events(event_key="e1")[0].id, "boom", now=T0)
    with store.engine.begin() as conn:
        assert ids_of(store.inbox.claim(conn, "acme/contacts", "c1", now=T0)) == ["e2"]
        assert ids_of(store.inbox.claim(conn, "acme/contacts", "c1", now=T0 + timedelta(hours=2))) == ["e1", "e2"]


def test_postgres_claims_skip_rows_another_transaction_holds(postgres_url: str) -> None:
    with Store(postgres_url) as store:
        store.inbox.receive("acme", [pending(f"e{i}") for i in range(4)])
        holding = threading.Event()
        release = threading.Event()
        first: list[str] = []

        def hold() -> None:
            with store.engine.begin() as conn:
                first.extend(ids_of(store.inbox.claim(conn, "acme/contacts", "c1", limit=2)))
                holding.set()
                release.wait(10)

        thread = threading.Thread(target=hold)
        thread.start()
        assert holding.wait(10)
        with store.engine.begin() as conn:
            second = ids_of(store.inbox.claim(conn, "acme/contacts", "c1"))
        release.set()
        thread.join(10)
    assert first == ["e0", "e1"]
    assert second == ["e2", "e3"]


# -- failures, dead letters, replay ----------------------------------------------------------------


def test_mark_failed_backs_off_exponentially_then_dead_letters_with_the_error(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1")])
    event_id = store.inbox.events()[0].id
    waits = []
    for attempt in range(1, 4):
        assert store.inbox.mark_failed(event_id, f"boom {attempt}", max_attempts=4, now=T0) == "pending"
        row = store.inbox.get(event_id)
        assert row.attempts == attempt and row.last_error == f"boom {attempt}"
        waits.append((row.next_attempt_at - T0).total_seconds())
    assert waits == [2.0, 4.0, 8.0]
    assert store.inbox.mark_failed(event_id, "boom 4", max_attempts=4, now=T0) == "dead"
    dead = store.inbox.get(event_id)
    assert (dead.status, dead.attempts, dead.last_error, dead.next_attempt_at) == ("dead", 4, "boom 4", None)
    assert store.inbox.due_partitions(now=T0 + timedelta(days=1)) == []


def test_backoff_is_capped_at_an_hour() -> None:
    assert retry_delay(30) == timedelta(hours=1)
    assert retry_delay(3, base_delay_s=0) == timedelta(0)


def test_mark_failed_leaves_a_non_pending_event_alone_and_refuses_an_unknown_id(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1")])
    event_id = store.inbox.events()[0].id
    with store.engine.begin() as conn:
        store.inbox.mark_done(conn, [event_id])
    assert store.inbox.mark_failed(event_id, "late failure") == "done"
    assert store.inbox.get(event_id).attempts == 0
    with pytest.raises(LookupError):
        store.inbox.mark_failed(event_id + 1000, "nope")
    with pytest.raises(ValueError, match="max_attempts"):
        store.inbox.mark_failed(event_id, "nope", max_attempts=0)


def test_replay_dead_restarts_them_from_zero_attempts(store: Store) -> None:
    store.inbox.receive("acme", [pending("e1"), pending("e2")])
    store.inbox.receive("other", [pending("o1")])
    for row in store.inbox.events():
        store.inbox.mark_failed(row.id, "boom", max_attempts=1)
    assert store.inbox.count(status="dead") == 3
    assert store.inbox.replay("dead", connections=store.connections, provider="acme") == 2
    revived = store.inbox.events(status="pending")
    assert ids_of(revived) == ["e1", "e2"]
    # Due at once, with a requeue time of their own (the sensor's run keys must not repeat).
    assert all(e.attempts == 0 and e.next_attempt_at is not None and e.processed_at is None for e in revived)
    [partition] = store.inbox.due_partitions()
    assert partition.requeued_at == max(e.next_attempt_at for e in revived)
    assert ids_of(store.inbox.events(status="dead")) == ["o1"]
    with store.engine.begin() as conn:
        assert ids_of(store.inbox.claim(conn, "acme/contacts", "c1")) == ["e1", "e2"]


def test_replay_unroutable_routes_to_connections_added_since(store: Store) -> None:
    unroutable = [
        RoutedEvent(event_key="u1", event_type="t", account_id="acct-9", payload={"n": 1}, sync="acme/contacts"),
        RoutedEvent(event_key="u2", event_type="t", account_id="acct-unknown", payload={}, sync="acme/contacts"),
    ]
    store.inbox.receive("acme", unroutable)
    assert store.inbox.replay("unroutable", connections=store.connections) == 0
    store.connections.add("acme", "north", account_id="acct-9")
    store.connections.add("acme", "south", account_id="acct-9")
    assert store.inbox.replay("unroutable", connections=store.connections) == 2
    rows = {(e.event_key, e.connection_id): e for e in store.inbox.events()}
    assert rows[("u1", "")].status == "routed"
    assert rows[("u2", "")].status == "unroutable"
    assert rows[("u1", "north")].status == rows[("u1", "south")].status == "pending"
    assert rows[("u1", "north")].payload == {"n": 1}
    assert rows[("u1", "north")].received_at == rows[("u1", "")].received_at
    assert store.inbox.replay("unroutable", connections=store.connections) == 0


def test_replay_unroutable_does_not_duplicate_a_copy_a_redelivery_already_routed(store: Store) -> None:
    store.inbox.receive(
        "acme", [RoutedEvent(event_key="u1", event_type="t", account_id="acct-9", payload={}, sync="acme/contacts")]
    )
    store.connections.add("acme", "north", account_id="acct-9")
    store.inbox.receive("acme", [pending("u1", "north", account="acct-9")])  # the provider redelivered
    assert store.inbox.replay("unroutable", connections=store.connections) == 0
    assert sorted((e.connection_id, e.status) for e in store.inbox.events()) == [("", "routed"), ("north", "pending")]


def test_replay_unroutable_without_an_account_reaches_every_connection_of_the_provider(store: Store) -> None:
    store.inbox.receive("acme", [RoutedEvent(event_key="u1", event_type="t", payload={}, sync="acme/contacts")])
    store.connections.add("acme", "north", account_id="a")
    store.connections.add("acme", "south")
    store.connections.add("other", "west")
    assert store.inbox.replay("unroutable", connections=store.connections, provider="acme") == 2
    assert sorted(e.connection_id for e in store.inbox.events(status="pending")) == ["north", "south"]


# -- a removed connection ------------------------------------------------------------------------


def test_removing_a_connection_orphans_its_pending_events_and_adding_it_back_restores_them(store: Store) -> None:
    store.connections.add("acme", "c1", account_id="a1")
    store.connections.add("acme", "c2", account_id="a2")
    store.inbox.receive("acme", [pending("e1"), pending("e2", sync="acme/deals"), pending("done"), pending("x", "c2")])
    store.inbox.receive("other", [pending("o1", sync="other/contacts")])  # another provider's connection of the same id
    [done] = store.inbox.events(event_key="done")
    with store.engine.begin() as conn:
        store.inbox.mark_done(conn, [done.id])
    dead = store.inbox.events(event_key="e2")[0]
    store.inbox.mark_failed(dead.id, "boom", max_attempts=5)  # waiting for a retry: pending too

    assert store.connections.remove("acme", "c1") == 2
    orphans = store.inbox.events(status="orphaned")
    assert ids_of(orphans) == ["e1", "e2"]
    # Kept as they were (payload, attempts, error), out of the work queue: nothing claims them.
    assert orphans[1].attempts == 1 and orphans[1].last_error == "boom" and orphans[0].payload == {"id": "e1"}
    assert {p.connection_id for p in store.inbox.due_partitions() if p.sync.startswith("acme/")} == {"c2"}
    with store.engine.begin() as conn:
        assert store.inbox.claim(conn, "acme/contacts", "c1") == []
    assert store.inbox.get(done.id).status == "done"
    assert store.inbox.stats().counts["orphaned"] == 2
    assert store.inbox.replay("orphaned", connections=store.connections) == 0  # still no such connection
    assert store.inbox.purge(timedelta(seconds=1), now=T0 + timedelta(days=365 * 10)) == 1  # only the done one

    store.connections.add("acme", "c1", account_id="a1")
    back = store.inbox.events(status="pending", connection_id="c1", provider="acme")
    assert ids_of(back) == ["e1", "e2"] and store.inbox.count(status="orphaned") == 0
    # Due now, under a requeue time the sensor's run keys have not seen.
    due = {p.sync: p for p in store.inbox.due_partitions() if p.connection_id == "c1" and p.sync.startswith("acme/")}
    assert set(due) == {"acme/contacts", "acme/deals"} and all(p.requeued_at is not None for p in due.values())
    with store.engine.begin() as conn:
        assert ids_of(store.inbox.claim(conn, "acme/contacts", "c1")) == ["e1"]


def test_orphaned_events_are_replayable_once_the_connection_exists(store: Store) -> None:
    store.connections.add("acme", "c1", account_id="a1")
    store.inbox.receive("acme", [pending("e1")])
    store.connections.remove("acme", "c1")
    # Added back by hand, bypassing Connections.add (an older version, a restore from backup).
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(
                sa.table(
                    "connections",
                    sa.column("provider"),
                    sa.column("connection_id"),
                    sa.column("config"),
                    sa.column("status"),
                    sa.column("created_at"),
                    sa.column("updated_at"),
                )
            ).values(provider="acme", connection_id="c1", config="{}", status="active", created_at=T0, updated_at=T0)
        )
    assert store.inbox.replay("orphaned", connections=store.connections, provider="other") == 0
    assert store.inbox.replay("orphaned", connections=store.connections, provider="acme") == 1
    assert ids_of(store.inbox.events(status="pending")) == ["e1"]


def test_events_routed_to_a_removed_connection_are_orphaned_only_while_it_is_missing(store: Store) -> None:
    # A receiver routed these from a connections snapshot taken before the removal.
    store.inbox.receive("acme", [pending("late")])
    assert store.inbox.orphan_unregistered("acme", "c1") == 1
    store.connections.add("acme", "c1", account_id="a1")
    assert ids_of(store.inbox.events(status="pending")) == ["late"]
    store.inbox.receive("acme", [pending("next")])
    assert store.inbox.orphan_unregistered("acme", "c1") == 0  # it exists: its events stay pending
    assert store.inbox.count(status="pending", connection_id="c1") == 2


def test_replay_refuses_other_statuses(store: Store) -> None:
    with pytest.raises(ValueError, match="cannot replay"):
        store.inbox.replay("done", connections=store.connections)  # type: ignore[arg-type]


# -- stats ---------------------------------------------------------------------------------------------


def test_stats_count_every_status_and_age_the_oldest_pending_event(store: Store) -> None:
    empty = store.inbox.stats()
    assert set(empty.counts) == {"pending", "done", "dead", "unroutable", "ignored", "routed", "orphaned"}
    assert sum(empty.counts.values()) == 0 and empty.oldest_pending_age_s is None

    store.inbox.receive("acme", [pending("e1"), pending("e2"), RoutedEvent(event_key="i", event_type="t", payload={})])
    with store.engine.begin() as conn:
        conn.execute(sa.update(inbox).where(inbox.c.event_key == "e1").values(received_at=T0))
        conn.execute(sa.update(inbox).where(inbox.c.event_key == "e2").values(received_at=T0 + timedelta(seconds=30)))
    stats = store.inbox.stats(now=T0 + timedelta(seconds=90))
    assert stats.counts["pending"] == 2 and stats.counts["ignored"] == 1 and stats.counts["dead"] == 0
    assert stats.oldest_pending_received_at == T0
    assert stats.oldest_pending_age_s == 90.0


# -- retention -------------------------------------------------------------------------------------


def test_purge_deletes_only_old_finished_rows(store: Store) -> None:
    store.inbox.receive(
        "acme",
        [
            pending("done-old"),
            pending("pending-old"),
            pending("dead-old"),
            pending("done-new"),
            RoutedEvent(event_key="ignored-old", event_type="t", payload={}),
            RoutedEvent(event_key="unroutable-old", event_type="t", payload={}, sync="acme/contacts"),
        ],
    )
    with store.engine.begin() as conn:
        done = [e.id for e in store.inbox.events() if e.event_key.startswith("done")]
        store.inbox.mark_done(conn, done)
        month_ago = datetime.now(timezone.utc) - timedelta(days=30)
        conn.execute(sa.update(inbox).where(inbox.c.event_key.like("%-old")).values(received_at=month_ago))
    store.inbox.mark_failed(store.inbox.events(event_key="dead-old")[0].id, "boom", max_attempts=1)
    assert store.inbox.purge(timedelta(days=7)) == 2
    assert sorted(ids_of(store.inbox.events())) == ["dead-old", "done-new", "pending-old", "unroutable-old"]
    with pytest.raises(ValueError, match="positive"):
        store.inbox.purge(timedelta(0))
    with pytest.raises(ValueError, match="unknown status"):
        store.inbox.purge(timedelta(days=1), statuses=("finished",))  # type: ignore[arg-type]
