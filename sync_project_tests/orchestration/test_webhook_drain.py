"""Draining the inbox inside a webhook run, on both backends: merge and acknowledge atomically."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa

from sync_project.core import InboundEvent, ProviderConnection, SyncDefinition
from sync_project.orchestration.webhook_drain import DrainResult, drain_inbox
from sync_project.receiver import create_app
from sync_project.receiver.routing import route, subscribers_from
from sync_project.store import MergeStrategy, Store
from sync_project.store.schema import feed_entries, inbox
from sync_project_tests.webhook_support import (
    SECRET,
    SECRET_ENV,
    AcmeProvider,
    Failures,
    RunKilled,
    ServerThread,
    at,
    body_of,
    contacts_sync,
    event,
    sign,
)

log = logging.getLogger("test.webhook_drain")


@dataclass
class Setup:
    store: Store
    provider: AcmeProvider
    failures: Failures
    sync: SyncDefinition
    north: ProviderConnection
    south: ProviderConnection

    def deliver(self, *raw_events: dict[str, Any]) -> None:
        """Route and store events exactly as the receiver does."""
        events = [
            InboundEvent(event_key=e["id"], event_type=e["type"], account_id=e["account"], payload=e["data"])
            for e in raw_events
        ]
        routed = route("acme", events, self.store.connections, subscribers=subscribers_from([self.sync]))
        self.store.inbox.receive("acme", routed)

    def drain(self, connection: ProviderConnection | None = None, **options: Any) -> DrainResult:
        connection = connection or self.north
        with self.provider.client(connection) as client:
            return drain_inbox(self.store, self.sync, connection, client, log, **options)

    def record(self, key: str, connection_id: str = "north") -> Any:
        return self.store.get(self.sync.key, connection_id, key)

    def statuses(self) -> dict[str, str]:
        return {f"{e.event_key}@{e.connection_id}": e.status for e in self.store.inbox.events()}


def make_setup(store: Store, **sync_options: Any) -> Setup:
    failures = Failures()
    north = store.connections.add("acme", "north", account_id="acct-1")
    south = store.connections.add("acme", "south", account_id="acct-2")
    return Setup(store, AcmeProvider(), failures, contacts_sync(failures, **sync_options), north, south)


@pytest.fixture
def setup(store: Store) -> Setup:
    return make_setup(store)


def test_deliveries_received_for_real_are_merged_and_marked_done(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    app = create_app(setup.store, providers={"acme": setup.provider}, syncs=[setup.sync])
    deliveries = [
        body_of(event("evt-1", "contact.created", id="c1", name="Ada", updated_at=at(1))),
        body_of(event("evt-2", "contact.created", id="c2", name="Grace", updated_at=at(2))),
        body_of(event("evt-3", "contact.updated", id="c1", name="Ada L.", updated_at=at(3))),
    ]
    with ServerThread(app) as server:
        for body in deliveries:
            assert httpx.post(f"{server.url}/webhooks/acme", content=body, headers=sign(body)).status_code == 202

    result = setup.drain()

    assert (result.events_done, result.events_retrying, result.events_dead, result.batches) == (3, 0, 0, 1)
    assert (result.merge.added, result.merge.updated) == (2, 0)  # c1's two saves collapse to the newest
    assert setup.record("c1").data["name"] == "Ada L."
    assert setup.record("c2").data["name"] == "Grace"
    assert set(setup.statuses().values()) == {"done"}
    assert setup.store.inbox.due_partitions() == []


def test_a_save_then_a_delete_of_one_record_in_one_batch_ends_deleted(setup: Setup) -> None:
    setup.deliver(
        event("evt-1", "contact.created", id="c1", name="Ada", updated_at=at(1)),
        event("evt-2", "contact.created", id="c2", name="Grace", updated_at=at(1)),
        event("evt-3", "contact.deleted", id="c1"),
    )
    result = setup.drain()
    assert result.batches == 1 and result.events_done == 3
    assert setup.record("c1").deleted_at is not None
    assert setup.record("c1").data["name"] == "Ada"  # a tombstone keeps the last content
    assert setup.record("c2").deleted_at is None
    assert (result.merge.added, result.merge.deleted) == (2, 1)


def test_a_batch_split_into_several_merges_writes_one_feed_entry_and_the_feed_reads_its_final_state(
    setup: Setup,
) -> None:
    setup.deliver(
        event("evt-1", "contact.created", id="c1", name="Ada", updated_at=at(1)),
        event("evt-2", "contact.deleted", id="c1"),  # same key, other action: a second merge
        event("evt-3", "contact.created", id="c2", name="Grace", updated_at=at(1)),
        event("evt-4", "contact.patched", id="c2", name="Grace H."),  # a third merge
    )
    result = setup.drain()
    assert result.batches == 1 and result.events_done == 4
    with setup.store.engine.connect() as conn:
        entries = conn.execute(sa.select(feed_entries.c.external_ids, feed_entries.c.ids_listed)).all()
    assert [(json.loads(ids), listed) for ids, listed in entries] == [(["c1", "c2"], 2)]
    page = setup.store.changes(setup.sync.key, "north", limit=10)
    assert [(c.id, c.deleted_at is not None) for c in page.records] == [("c1", True), ("c2", False)]
    assert setup.record("c2").data["name"] == "Grace H."
    assert setup.record("c1").last_modified_at == setup.record("c2").last_modified_at  # one stamp

    # The next batch is stamped after it, and a feed cursor taken now sees only the next batch.
    setup.deliver(event("evt-5", "contact.updated", id="c2", name="Grace Hopper", updated_at=at(9)))
    setup.drain()
    later = setup.store.changes(setup.sync.key, "north", cursor=page.next_cursor, limit=10)
    assert [c.id for c in later.records] == ["c2"]
    assert setup.record("c2").last_modified_at > setup.record("c1").last_modified_at


def test_a_drain_applies_the_default_retention_to_done_events(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    setup.deliver(event("evt-old", id="c1", name="Ada", updated_at=at(1)))
    setup.drain()
    with setup.store.engine.begin() as conn:
        conn.execute(sa.update(inbox).values(received_at=datetime.now(timezone.utc) - timedelta(days=8)))
    setup.deliver(event("evt-new", id="c2", name="Grace", updated_at=at(1)))
    monkeypatch.setenv("SYNC_INBOX_RETENTION_DAYS", "0")  # 0 keeps every done event
    setup.drain()
    assert sorted(setup.statuses()) == ["evt-new@north", "evt-old@north"]
    monkeypatch.delenv("SYNC_INBOX_RETENTION_DAYS")  # the default: 7 days
    setup.drain()  # nothing to drain: retention runs only after a drain that applied events
    assert sorted(setup.statuses()) == ["evt-new@north", "evt-old@north"]
    setup.deliver(event("evt-third", id="c3", name="Edsger", updated_at=at(1)))
    setup.drain()
    assert setup.statuses() == {"evt-new@north": "done", "evt-third@north": "done"}
    assert setup.record("c1") is not None  # retention removes events, never records


def test_partial_updates_in_one_batch_apply_in_event_order(setup: Setup) -> None:
    setup.deliver(
        event("evt-1", "contact.created", id="c1", name="Ada", email={"home": "a@home"}, updated_at=at(1)),
        event("evt-2", "contact.patched", id="c1", email="a@plain"),
        event("evt-3", "contact.patched", id="c1", email={"work": "a@work"}),
    )
    setup.drain()
    data = setup.record("c1").data
    # One by one: the object is replaced by text, then the text by a new object. Merging the two
    # patches first would have kept "home".
    assert (data["name"], data["email"]) == ("Ada", {"work": "a@work"})


def test_a_batchs_own_earlier_writes_do_not_make_its_later_events_stale(store: Store) -> None:
    setup = make_setup(store, strategy=MergeStrategy.IGNORE_IF_MODIFIED_AFTER)
    setup.deliver(
        event("evt-1", "contact.created", id="c1", name="v1"),
        event("evt-2", "contact.patched", id="c1", email="e@x"),
        event("evt-3", "contact.updated", id="c1", name="v3"),
        event("evt-4", "contact.deleted", id="c2"),
        event("evt-5", "contact.created", id="c2", name="back"),
    )
    result = setup.drain()
    assert result.merge.skipped_stale == 0
    assert setup.record("c1").data == {"id": "c1", "name": "v3"}
    assert setup.record("c2").deleted_at is None and setup.record("c2").data["name"] == "back"


def test_an_out_of_order_webhook_does_not_overwrite_a_newer_copy(setup: Setup) -> None:
    setup.deliver(
        event("evt-1", "contact.updated", id="c1", name="newer", updated_at=at(10)),
        event("evt-2", "contact.updated", id="c1", name="older", updated_at=at(5)),
    )
    result = setup.drain(batch_size=1)
    assert result.batches == 2 and result.merge.skipped_stale == 1
    assert setup.record("c1").data["name"] == "newer"


def test_the_outcome_does_not_depend_on_how_events_are_batched(setup: Setup) -> None:
    """One event per merge is the reference; big batches (split, collapsed) must end the same."""
    rng = random.Random(4)
    # Provider timestamps mostly before now: a delete (stamped when its handler ran) beats the older
    # saves and loses to the few newer ones, so records end both deleted and alive.
    now = datetime.now(timezone.utc)
    events = []
    for i in range(300):
        key = f"c{rng.randrange(10)}"
        kind = rng.choices(["contact.updated", "contact.patched", "contact.deleted"], weights=[4, 5, 1])[0]
        if kind == "contact.updated":
            stamp = (now + timedelta(hours=rng.randrange(-96, 3))).isoformat()
            data = {"id": key, "name": f"v{i}", "email": {"home": f"{i}@h"}, "updated_at": stamp}
        elif kind == "contact.patched":
            data = {"id": key, "email": rng.choice([f"{i}@plain", {"work": f"{i}@w"}]), "tags": [i]}
        else:
            data = {"id": key}
        events.append(event(f"evt-{i}", kind, account=None, **data))  # no account: both connections
    setup.deliver(*events)

    one_by_one = setup.drain(setup.north, batch_size=1)
    batched = setup.drain(setup.south, batch_size=500)

    assert (one_by_one.events_done, batched.events_done, batched.batches) == (300, 300, 1)
    reference = setup.store.dataframe(setup.sync.key, "north", include_deleted=True)
    result = setup.store.dataframe(setup.sync.key, "south", include_deleted=True)

    def state(frame: pd.DataFrame) -> dict[str, tuple[str, str, str, bool]]:
        return {
            row["_id"]: (row["name"], str(row["email"]), str(row.get("tags")), bool(pd.notna(row["_deleted_at"])))
            for row in frame.to_dict("records")
        }

    assert state(result) == state(reference)
    assert len(reference) == 10
    assert 0 < sum(deleted for *_, deleted in state(reference).values()) < 10


def test_a_thin_event_is_completed_through_the_provider_client(setup: Setup) -> None:
    setup.provider.api.contacts["c9"] = {"id": "c9", "name": "Fetched", "email": "f@x", "updated_at": at(9)}
    setup.deliver(event("evt-1", "contact.changed", id="c9"))
    result = setup.drain()
    assert result.events_done == 1 and setup.provider.api.requests == 1
    assert setup.record("c9").data == setup.provider.api.contacts["c9"]


def test_a_failing_handler_fails_only_its_event_and_retries_after_a_backoff(setup: Setup) -> None:
    setup.failures.failing.add("evt-2")
    setup.deliver(*(event(f"evt-{i}", "contact.created", id=f"c{i}", updated_at=at(i)) for i in range(1, 4)))
    result = setup.drain()
    assert (result.events_done, result.events_retrying, result.events_dead) == (2, 1, 0)
    assert setup.store.count(setup.sync.key, "north") == 2
    failed = setup.store.inbox.events(event_key="evt-2")[0]
    assert (failed.status, failed.attempts) == ("pending", 1)
    assert "ProviderError: upstream refused evt-2" in (failed.last_error or "")
    assert failed.next_attempt_at is not None and failed.next_attempt_at > failed.received_at
    again = setup.drain()  # not due yet: nothing to do
    assert (again.batches, again.events_claimed) == (0, 0)


def test_a_handler_that_keeps_failing_is_dead_lettered_and_replay_recovers_it(setup: Setup) -> None:
    setup.failures.failing.add("evt-1")
    setup.deliver(event("evt-1", "contact.created", id="c1", name="Ada", updated_at=at(1)))
    result = setup.drain(max_attempts=3, retry_base_delay_s=0)
    assert (result.events_done, result.events_dead, result.batches) == (0, 1, 3)
    dead = setup.store.inbox.events(event_key="evt-1")[0]
    assert (dead.status, dead.attempts) == ("dead", 3)
    assert "upstream refused evt-1" in (dead.last_error or "")
    assert setup.failures.handled == ["evt-1"] * 3

    setup.failures.failing.clear()
    assert setup.store.inbox.replay("dead", connections=setup.store.connections) == 1
    recovered = setup.drain()
    assert recovered.events_done == 1
    assert setup.record("c1").data["name"] == "Ada"
    assert setup.statuses() == {"evt-1@north": "done"}


def test_a_record_the_store_refuses_fails_only_the_event_that_returned_it(setup: Setup) -> None:
    setup.deliver(
        event("evt-1", "contact.created", id="c1", updated_at=at(1)),
        event("evt-2", "contact.bad"),
    )
    result = setup.drain()
    assert (result.events_done, result.events_retrying) == (1, 1)
    assert "InvalidBatchError" in (setup.store.inbox.events(event_key="evt-2")[0].last_error or "")
    assert setup.record("c1") is not None


def test_a_run_killed_mid_batch_leaves_every_event_pending_and_nothing_merged(setup: Setup) -> None:
    setup.failures.crash_on.add("evt-3")
    setup.deliver(*(event(f"evt-{i}", "contact.created", id=f"c{i}", updated_at=at(i)) for i in range(1, 6)))
    with pytest.raises(RunKilled):
        setup.drain()
    assert set(setup.statuses().values()) == {"pending"}
    assert setup.store.count(setup.sync.key, "north") == 0
    assert all(e.attempts == 0 for e in setup.store.inbox.events())

    setup.failures.crash_on.clear()
    result = setup.drain()
    assert result.events_done == 5
    assert setup.store.count(setup.sync.key, "north") == 5


def test_max_events_bounds_one_drain_and_the_rest_waits(setup: Setup) -> None:
    setup.deliver(*(event(f"evt-{i}", "contact.created", id=f"c{i}", updated_at=at(i)) for i in range(7)))
    first = setup.drain(batch_size=3, max_events=5)
    assert (first.events_done, first.batches) == (5, 2)
    assert setup.store.inbox.count(status="pending") == 2
    rest = setup.drain(batch_size=3)
    assert (rest.events_done, rest.batches) == (2, 1)


def test_two_connections_drain_independently(setup: Setup) -> None:
    setup.deliver(
        event("evt-1", "contact.created", account="acct-1", id="c1", updated_at=at(1)),
        event("evt-2", "contact.created", account="acct-2", id="c1", name="south's", updated_at=at(1)),
    )
    setup.failures.failing.add("evt-2")  # south's handler failing does not hold north back
    assert setup.drain(setup.north).events_done == 1
    assert setup.statuses() == {"evt-1@north": "done", "evt-2@south": "pending"}
    assert setup.record("c1", "south") is None
    setup.failures.failing.clear()
    assert setup.drain(setup.south).events_done == 1
    assert setup.record("c1", "south").data["name"] == "south's"


def test_a_sync_without_a_handler_cannot_drain(setup: Setup) -> None:
    bare = contacts_sync(webhook_events=(), on_webhook=None)
    with pytest.raises(ValueError, match="no on_webhook"), httpx.Client() as client:
        drain_inbox(setup.store, bare, setup.north, client, log)


def test_each_batch_logs_one_line(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    setup.deliver(*(event(f"evt-{i}", "contact.created", id=f"c{i}", updated_at=at(i)) for i in range(5)))
    setup.drain(batch_size=2)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 3
    assert lines[0].startswith("inbox acme/contacts/north: batch of 2 events: 2 done, 0 retrying, 0 dead; added 2")
