"""The real-time path end to end on a real Dagster instance: sandbox webhooks -> receiver -> inbox
-> inbox sensor -> webhook-mode runs -> records, on both store backends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import dagster as dg
import pytest
from sqlalchemy import update

from sync_project.store import Store
from sync_project.store.inbox import Inbox
from sync_project.store.schema import inbox
from sync_project_tests.support.realtime import RealtimeHarness, sandbox_syncs, stored_state, with_handler


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def harness(store: Store, instance: dg.DagsterInstance) -> Iterator[RealtimeHarness]:
    realtime = RealtimeHarness(store, instance, stall_after_s=0.0)
    realtime.connect("demo-1", "acct-1")
    realtime.connect("demo-2", "acct-2")
    yield realtime
    realtime.close()


def assert_store_matches_truth(harness: RealtimeHarness, connection_id: str, account_id: str) -> None:
    truth = harness.admin.truth(account_id)
    for kind in ("contacts", "deals"):
        live, deleted = stored_state(harness.store, f"sandbox/{kind}", connection_id)
        sync = next(s for s in harness.syncs if s.name == kind)
        expected = {o["id"]: sync.model.model_validate(o).model_dump(mode="json") for o in truth[kind]}
        assert live == expected
        # Accounts start empty, so every object came through a webhook: every delete is a tombstone.
        assert deleted == set(truth["deleted"][kind])


def test_deliveries_become_merged_records_and_done_events(harness: RealtimeHarness) -> None:
    harness.admin.apply_changes(40, account_id="acct-1")
    harness.admin.apply_changes(25, account_id="acct-2")
    harness.admin.flush()
    runs = harness.drain_until_quiet()
    assert runs == 4  # contacts and deals for each connection
    assert all(result.success for result in harness.results)
    assert harness.store.inbox.stats().counts["pending"] == 0
    assert harness.store.inbox.stats().counts["done"] == 65
    assert_store_matches_truth(harness, "demo-1", "acct-1")
    assert_store_matches_truth(harness, "demo-2", "acct-2")
    [first] = [
        r for r in harness.results if r.dagster_run.tags["sync/asset_partition"] == "sandbox/contacts:demo-1:drain"
    ]
    assert first.dagster_run.tags["sync/mode"] == "webhook"
    # One materialization as the batch committed (the UI shows it while the run still lingers),
    # then the run's own with its totals.
    batch, materialization = first.asset_materializations_for_node("sandbox__contacts")
    assert batch.partition == materialization.partition == "demo-1"
    assert batch.metadata["batches"].value == 1
    assert batch.metadata["events_drained"].value == materialization.metadata["events_drained"].value > 0
    assert materialization.metadata["mode"].value == "webhook"
    assert materialization.metadata["materializations_during_run"].value == 1
    # Nothing new: the sensor requests nothing, even with its run keys all used.
    assert harness.step() == []


def test_two_connections_proceed_independently(harness: RealtimeHarness) -> None:
    harness.store.connections.set_status("sandbox", "demo-2", "paused")
    harness.admin.apply_changes(10, account_id="acct-1")
    harness.admin.apply_changes(10, account_id="acct-2")
    harness.admin.flush()
    harness.drain_until_quiet()
    assert {r.dagster_run.tags["sync/asset_partition"].split(":")[1] for r in harness.results} == {"demo-1"}
    assert harness.store.inbox.count(status="pending", connection_id="demo-2") == 10
    assert_store_matches_truth(harness, "demo-1", "acct-1")

    # demo-1's partition is busy (a live drainer holds its leases): demo-2 still goes ahead.
    harness.store.connections.set_status("sandbox", "demo-2", "active")
    harness.admin.apply_changes(5, account_id="acct-1")
    harness.admin.flush()
    holding = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with (
            harness.store.leases.hold("sandbox/contacts", "demo-1", "drain", "live-drainer", ttl_s=2),
            harness.store.leases.hold("sandbox/deals", "demo-1", "drain", "live-drainer", ttl_s=2),
        ):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    holding.wait(10)
    try:
        results = harness.step()
    finally:
        release.set()
        holder.join()
    by_connection = {}
    for result in results:
        by_connection.setdefault(result.dagster_run.tags["sync/asset_partition"].split(":")[1], []).append(
            result.success
        )
    assert by_connection["demo-2"] and all(by_connection["demo-2"])
    # demo-1's runs saw the live drainer renew, left it the events, and drained nothing themselves.
    for result in results:
        if result.dagster_run.tags["sync/asset_partition"].split(":")[1] == "demo-1":
            *_, materialization = result.asset_materializations_for_node(
                result.dagster_run.job_name.removesuffix("_job")
            )
            assert materialization.metadata["deferred_to_run"].value == "live-drainer"
    assert harness.store.inbox.count(status="pending", connection_id="demo-1") > 0
    assert harness.store.inbox.count(status="pending", connection_id="demo-2") == 0
    assert_store_matches_truth(harness, "demo-2", "acct-2")
    harness.drain_until_quiet()  # the busy partition is requested again and catches up
    assert_store_matches_truth(harness, "demo-1", "acct-1")


def test_a_run_that_dies_before_committing_loses_nothing(harness: RealtimeHarness, monkeypatch) -> None:
    harness.admin.apply_changes(12, account_id="acct-1")
    harness.admin.flush()
    original = Inbox.mark_done
    crashes = {"left": 1}

    def crash_once(self, conn, ids, **kwargs):  # noqa: ANN001 - same signature as Inbox.mark_done
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("worker killed mid-transaction")
        return original(self, conn, ids, **kwargs)

    monkeypatch.setattr(Inbox, "mark_done", crash_once)
    before = {
        kind: harness.store.count(f"sandbox/{kind}", "demo-1", include_deleted=True) for kind in ("contacts", "deals")
    }
    first = harness.step()
    assert [r.success for r in first].count(False) == 1
    crashed = next(r for r in first if not r.success)
    crashed_sync = crashed.dagster_run.tags["sync/asset_partition"].split(":")[0]
    assert harness.store.count(crashed_sync, "demo-1", include_deleted=True) == before[crashed_sync.split("/")[1]]
    assert harness.store.inbox.count(status="pending", sync=crashed_sync) > 0
    harness.drain_until_quiet()  # the stalled partition is requested again under a new key
    assert harness.store.inbox.stats().counts["pending"] == 0
    assert_store_matches_truth(harness, "demo-1", "acct-1")


def test_a_failing_handler_is_dead_lettered_after_eight_tries_and_replay_recovers_it(store: Store, instance) -> None:
    contacts = next(s for s in sandbox_syncs() if s.name == "contacts")
    broken = {"on": True}

    def flaky(ctx, event):  # noqa: ANN001 - a WebhookFn
        if broken["on"]:
            raise ValueError("downstream schema mismatch")
        return contacts.on_webhook(ctx, event)

    harness = RealtimeHarness(store, instance, syncs=[with_handler(contacts, flaky)], stall_after_s=0.0)
    try:
        harness.connect("demo-1", "acct-1")
        harness.admin.apply_changes(3, account_id="acct-1", create=1, update=0, delete=0)
        harness.admin.flush()
        pending = harness.store.inbox.events(status="pending")
        contact_events = [e for e in pending if e.sync == "sandbox/contacts"]
        assert contact_events
        for attempt in range(1, 9):
            assert harness.step(), f"no run requested for attempt {attempt}"
            # Time passes: the retry's backoff is over.
            with store.engine.begin() as conn:
                conn.execute(update(inbox).where(inbox.c.status == "pending").values(next_attempt_at=None))
        dead = harness.store.inbox.events(status="dead")
        assert {e.id for e in dead} == {e.id for e in contact_events}
        assert all(e.attempts == 8 and "downstream schema mismatch" in (e.last_error or "") for e in dead)
        assert harness.step() == []  # dead letters are not retried
        assert store.count("sandbox/contacts", "demo-1") == 0

        broken["on"] = False
        assert harness.store.inbox.replay("dead", connections=store.connections) == len(dead)
        harness.drain_until_quiet()
        assert harness.store.inbox.stats().counts["dead"] == 0
        truth = harness.admin.truth("acct-1")
        assert store.count("sandbox/contacts", "demo-1") == len(truth["contacts"]) > 0
    finally:
        harness.close()


def test_a_lingering_webhook_run_applies_events_that_arrive_while_it_runs(harness: RealtimeHarness) -> None:
    harness.admin.apply_changes(3, account_id="acct-1", create=1, update=0, delete=0)
    harness.admin.flush()
    job = harness.defs.resolve_job_def("sandbox__contacts_job")
    outcome: dict[str, dg.ExecuteInProcessResult] = {}

    def run() -> None:
        outcome["result"] = job.execute_in_process(
            instance=harness.instance,
            partition_key="demo-1",
            run_config={"ops": {"sandbox__contacts": {"config": {"mode": "webhook", "linger_s": 3.0}}}},
        )

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 30
    while harness.store.inbox.count(status="pending", sync="sandbox/contacts") and time.monotonic() < deadline:
        time.sleep(0.05)
    first_wave = harness.store.inbox.high_water_mark()
    harness.admin.apply_changes(8, account_id="acct-1", create=1, update=0, delete=0)  # while the run lingers
    harness.admin.flush()
    # The run ends 3 s after its last event; under load its teardown (compute logs) takes a while.
    runner.join(180)
    assert not runner.is_alive(), "the lingering run did not end"
    *batches, materialization = outcome["result"].asset_materializations_for_node("sandbox__contacts")
    contact_events = harness.store.inbox.events(status="done", sync="sandbox/contacts")
    assert any(event.id > first_wave for event in contact_events)
    assert materialization.metadata["events_drained"].value == len(contact_events)
    # The first wave's batch was recorded as it committed; the second's at once or with the run's.
    assert batches and batches[0].metadata["events_drained"].value >= 1
    assert sum(batch.metadata["events_drained"].value for batch in batches) <= len(contact_events)
    assert materialization.metadata["materializations_during_run"].value == len(batches)
    assert harness.store.inbox.count(status="pending", sync="sandbox/contacts") == 0


def test_a_lingering_run_ends_at_its_cap_while_events_keep_coming(harness: RealtimeHarness) -> None:
    harness.admin.apply_changes(2, account_id="acct-1", create=1, update=0, delete=0)
    harness.admin.flush()
    stop = threading.Event()

    def keep_changing() -> None:
        while not stop.is_set():
            harness.admin.apply_changes(1, account_id="acct-1", create=1, update=0, delete=0)
            stop.wait(0.2)

    producer = threading.Thread(target=keep_changing)
    producer.start()
    job = harness.defs.resolve_job_def("sandbox__contacts_job")
    try:
        result = job.execute_in_process(
            instance=harness.instance,
            partition_key="demo-1",
            run_config={
                "ops": {
                    "sandbox__contacts": {"config": {"mode": "webhook", "linger_s": 600.0, "max_linger_run_s": 2.0}}
                }
            },
        )
    finally:
        stop.set()
        producer.join()
    # It ended although events never stopped for its 600 s linger, and reported what it drained.
    assert result.success
    *_, materialization = result.asset_materializations_for_node("sandbox__contacts")
    assert materialization.metadata["events_drained"].value > 0
