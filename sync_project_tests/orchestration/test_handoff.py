"""Standing drainers' pieces on real stores and a real Dagster instance: a successor waits for its
live predecessor's release (an ordinary drain defers to it), a drain ends within one batch of its
deadline, and the inbox sensor requests a successor near a drainer's cap and a replacement for a
drainer whose lease expired."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import dagster as dg

from sync_project.orchestration.partition_run import RunSettings, run_partition
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG, drain_slot, drain_tags, partitions_name
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG, RunLimits
from sync_project.store import Store
from sync_project_tests.orchestration.test_inbox_sensor import Ticker, deliver, instance  # noqa: F401 - fixture
from sync_project_tests.orchestration.test_webhook_drain import log, make_setup
from sync_project_tests.webhook_support import at, event


def hold_drain_lease(store: Store, sync: str, holder: str, held_s: float, ready: threading.Event) -> threading.Thread:
    def hold() -> None:
        with store.hold_lease(sync, "north", "drain", holder, ttl_s=3.0):
            ready.set()
            time.sleep(held_s)

    thread = threading.Thread(target=hold, name=f"holder {holder}")
    thread.start()
    return thread


def test_a_successor_waits_for_its_live_predecessor_and_drains_after_it(store: Store) -> None:
    setup = make_setup(store)
    ready = threading.Event()
    holder = hold_drain_lease(store, setup.sync.key, "run-a", 2.5, ready)
    try:
        assert ready.wait(30)
        setup.deliver(event("ev-1", "contact.created", id="c1", name="Ada", updated_at=at(1)))
        settings = RunSettings(handoff_wait_s=30.0, lease_ttl_s=3.0, linger_s=0.0)
        ran = run_partition(store, setup.sync, setup.provider, setup.north, mode="webhook", run_id="run-b", log=log, settings=settings)
    finally:
        holder.join(30)
    assert ran.deferred_to is None
    assert ran.drained is not None and ran.drained.events_done == 1


def test_an_ordinary_drain_defers_to_a_live_drainer(store: Store) -> None:
    setup = make_setup(store)
    ready = threading.Event()
    holder = hold_drain_lease(store, setup.sync.key, "run-a", 3.0, ready)
    try:
        assert ready.wait(30)
        settings = RunSettings(lease_ttl_s=3.0)
        ran = run_partition(store, setup.sync, setup.provider, setup.north, mode="webhook", run_id="run-b", log=log, settings=settings)
    finally:
        holder.join(30)
    assert ran.deferred_to == "run-a"


def test_a_drain_past_its_deadline_ends_after_one_batch(store: Store) -> None:
    setup = make_setup(store)
    setup.deliver(*[event(f"ev-{n}", "contact.created", id=f"c{n}", name="Ada", updated_at=at(n)) for n in range(5)])
    batches: list[int] = []
    drained = setup.drain(batch_size=2, deadline=time.monotonic() - 1, on_batch=lambda batch: batches.append(batch.events_done))
    assert (drained.batches, drained.events_done, batches) == (1, 2, [2])
    assert store.inbox.count(status="pending") == 3
    rest = setup.drain(batch_size=2, on_batch=lambda batch: batches.append(batch.events_done))
    assert (rest.events_done, batches) == (3, [2, 2, 1])


def started_drain_run(ticker: Ticker, instance: dg.DagsterInstance, started_ago: timedelta, slot: int = 0) -> dg.DagsterRun:
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1"])  # a drainer's partition exists
    job = ticker.defs.resolve_job_def("sandbox__contacts_job")
    run = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**drain_tags("sandbox/contacts", "c1", slot), "sync/mode": "webhook", MAX_RUNTIME_TAG: "780"},
    )
    started = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name)
    instance.report_dagster_event(started, run.run_id, timestamp=(datetime.now(timezone.utc) - started_ago).timestamp())
    return run


def test_the_sensor_requests_a_successor_before_a_drainers_cap(store, instance) -> None:
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    limits = RunLimits()
    young = started_drain_run(ticker, instance, timedelta(seconds=30))
    lease = store.leases.acquire("sandbox/contacts", "c1", "drain", young.run_id, ttl_s=120)
    deliver(store, "e1")
    # A live drainer well before its cap drains these events itself: nothing is requested.
    assert not ticker.tick().run_requests
    store.leases.release(lease)
    instance.report_run_failed(young)

    old = started_drain_run(ticker, instance, limits.webhook_linger_cap - limits.handoff_lead + timedelta(seconds=1))
    store.leases.acquire("sandbox/contacts", "c1", "drain", old.run_id, ttl_s=120)
    [request] = ticker.tick().run_requests
    assert request.tags["sync/successor_of"] == old.run_id
    assert request.tags[DRAIN_PARTITION_TAG] == "sandbox/contacts:c1"
    assert drain_slot(request.tags) != 0  # beside its predecessor, not queued behind it
    config = request.run_config["ops"]["sandbox__contacts"]["config"]
    assert config["handoff_wait_s"] == limits.handoff_wait.total_seconds()


def test_the_sensor_replaces_a_drainer_whose_lease_expired(store, instance) -> None:
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    dead = started_drain_run(ticker, instance, timedelta(seconds=40))
    store.leases.acquire("sandbox/contacts", "c1", "drain", dead.run_id, ttl_s=0.5)
    time.sleep(3.0)  # expired, beyond the grace: its worker no longer renews it
    [request] = ticker.tick().run_requests  # even with no due events: the partition had a drainer
    assert request.tags["sync/replaces"] == dead.run_id
    assert drain_slot(request.tags) == 1
    assert request.run_config["ops"]["sandbox__contacts"]["config"]["handoff_wait_s"] == 0.0


def test_the_sensor_replaces_a_drainer_whose_run_ended_holding_its_lease(store, instance) -> None:
    # A worker killed alone: its code server fails the run within a second, the lease stays held
    # until it expires. With no events due, the partition would otherwise wait for the next one.
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    dead = started_drain_run(ticker, instance, timedelta(seconds=40))
    store.leases.acquire("sandbox/contacts", "c1", "drain", dead.run_id, ttl_s=0.5)
    instance.report_run_failed(dead)
    assert not ticker.tick().run_requests  # within its TTL and the grace: it may still release
    time.sleep(3.0)
    [request] = ticker.tick().run_requests
    assert request.tags["sync/replaces"] == dead.run_id and drain_slot(request.tags) == 0
    # Requested once: the next tick leaves it to the replacement (same run key, skipped by Dagster).
    assert [r.run_key for r in ticker.tick().run_requests] == [request.run_key]
