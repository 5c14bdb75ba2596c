"""Standing drainers' pieces on real stores and a real Dagster instance: a successor waits for its
live predecessor's release (an ordinary drain defers to it), a drain ends within one batch of its
deadline, and the inbox sensor requests a successor near a drainer's cap and a replacement for a
drainer whose lease expired; a provider's standby drains a partition without a drainer at once
and hands it to the partition's own drainer, which the inbox sensor requests; the standby sensor
keeps one standby up, replaces a dead one and starts its successor."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import dagster as dg

from sync_project.orchestration.partition_run import RunSettings, run_partition
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG, drain_slot, drain_tags, partitions_name
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG, RunLimits
from sync_project.orchestration.standby import Standby, StandbySettings, standby_lease_key
from sync_project.orchestration.standby_job import standby_job_name, standby_tags
from sync_project.store import Store
from sync_project_tests.orchestration.test_inbox_sensor import Ticker, deliver, instance  # noqa: F401 - fixture
from sync_project_tests.orchestration.test_webhook_drain import log, make_setup
from sync_project_tests.webhook_support import at, event


def hold_drain_lease(store: Store, sync: str, holder: str, held_s: float, ready: threading.Event) -> threading.Thread:
    def hold() -> None:
        with store.leases.hold(sync, "north", "drain", holder, ttl_s=3.0):
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
        ran = run_partition(
            store, setup.sync, setup.provider, setup.north, mode="webhook", run_id="run-b", log=log, settings=settings
        )
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
        ran = run_partition(
            store, setup.sync, setup.provider, setup.north, mode="webhook", run_id="run-b", log=log, settings=settings
        )
    finally:
        holder.join(30)
    assert ran.deferred_to == "run-a"


def test_a_drain_past_its_deadline_ends_after_one_batch(store: Store) -> None:
    setup = make_setup(store)
    setup.deliver(*[event(f"ev-{n}", "contact.created", id=f"c{n}", name="Ada", updated_at=at(n)) for n in range(5)])
    batches: list[int] = []
    drained = setup.drain(
        batch_size=2, deadline=time.monotonic() - 1, on_batch=lambda batch: batches.append(batch.events_done)
    )
    assert (drained.batches, drained.events_done, batches) == (1, 2, [2])
    assert store.inbox.count(status="pending") == 3
    rest = setup.drain(batch_size=2, on_batch=lambda batch: batches.append(batch.events_done))
    assert (rest.events_done, batches) == (3, [2, 2, 1])


def started_drain_run(
    ticker: Ticker, instance: dg.DagsterInstance, started_ago: timedelta, slot: int = 0
) -> dg.DagsterRun:
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1"])  # a drainer's partition exists
    job = ticker.defs.resolve_job_def("sandbox__contacts_job")
    run = instance.create_run_for_job(
        job,
        status=dg.DagsterRunStatus.NOT_STARTED,
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


def test_a_standby_drains_a_partition_without_a_drainer_at_once_and_hands_it_over(store: Store) -> None:
    setup = make_setup(store)
    key = setup.sync.key
    # south has a live drainer of its own: the standby leaves its events to it.
    stop_south, south_held = threading.Event(), threading.Event()

    def hold_south() -> None:
        with store.leases.hold(key, "south", "drain", "run-south", ttl_s=3.0):
            south_held.set()
            stop_south.wait(60)

    south = threading.Thread(target=hold_south)
    south.start()
    batches: list[tuple[str, int]] = []
    released: list[tuple[str, int, str | None]] = []
    handed_over: set[str] = set()
    standby = Standby(
        store,
        {key: setup.sync},
        setup.provider,
        run_id="standby-1",
        log=log,
        settings=StandbySettings(max_run_s=60.0, idle_release_s=60.0, lease_ttl_s=3.0, wake_fallback_s=0.5),
        on_batch=lambda sync, connection_id, batch: batches.append((connection_id, batch.events_done)),
        on_release=lambda held, error: released.append(
            (held.connection.connection_id, held.drained.events_done, error)
        ),
        handed_over=lambda: set(handed_over),
    )
    runner = threading.Thread(target=standby.run, name="standby")
    runner.daemon = True
    try:
        assert south_held.wait(30)
        runner.start()
        setup.deliver(
            event("ev-n", "contact.created", id="c1", name="Ada", updated_at=at(1), account="acct-1"),
            event("ev-s", "contact.created", id="c2", name="Grace", updated_at=at(1), account="acct-2"),
        )
        deadline = time.monotonic() + 30
        while setup.record("c1") is None:
            assert time.monotonic() < deadline, "the standby did not drain north's event"
            time.sleep(0.05)
        # It keeps the partition while it has traffic; south's drainer keeps south.
        holders = {(lease.connection_id, lease.holder) for lease in store.leases.list(key) if lease.role == "drain"}
        assert ("north", "standby-1") in holders and ("south", "run-south") in holders
        handed_over.add(f"{key}:north")  # north's own drainer run has started
        while not released:
            assert time.monotonic() < deadline, "the standby kept a partition whose drainer had started"
            time.sleep(0.05)
    finally:
        standby.stop()
        if runner.is_alive():
            runner.join(30)
        stop_south.set()
        south.join(30)
    assert batches == [("north", 1)] and released == [("north", 1, None)]
    assert store.inbox.count(status="pending") == 1  # south's event: its drainer's
    assert {(lease.connection_id, lease.holder) for lease in store.leases.list(key) if lease.role == "drain"} == {
        ("north", None),
        ("south", None),
    }


def standby_run(ticker: Ticker, instance: dg.DagsterInstance, started_ago: timedelta, slot: int = 0) -> dg.DagsterRun:
    job = ticker.defs.resolve_job_def(standby_job_name("sandbox"))
    run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.NOT_STARTED, tags=standby_tags("sandbox", slot))
    started = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name)
    instance.report_dagster_event(started, run.run_id, timestamp=(datetime.now(timezone.utc) - started_ago).timestamp())
    return run


def test_the_inbox_sensor_gives_a_partition_the_standby_holds_its_own_drainer(store, instance) -> None:
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1"])
    standby = standby_run(ticker, instance, timedelta(seconds=30))
    lease = store.leases.acquire("sandbox/contacts", "c1", "drain", standby.run_id, ttl_s=120)
    deliver(store, "e1")
    [request] = ticker.tick().run_requests
    assert request.tags["sync/successor_of"] == standby.run_id and request.partition_key == "c1"
    assert request.run_key == f"promote|sandbox/contacts|c1|{lease.token}"
    config = request.run_config["ops"]["sandbox__contacts"]["config"]
    assert config["handoff_wait_s"] > 0  # it waits for the standby's release


def test_the_standby_sensor_keeps_one_standby_up_replaces_a_dead_one_and_succeeds_it(store, instance) -> None:
    ticker = Ticker(store, instance, sensor="standby_sensor")
    limits = RunLimits()
    assert not ticker.tick().run_requests  # no connection: nothing to stand by for
    store.connections.add("sandbox", "c1", account_id="a1")
    [first] = ticker.tick().run_requests
    assert first.job_name == standby_job_name("sandbox") and first.tags["sync/standby"] == "sandbox"
    dead = standby_run(ticker, instance, timedelta(seconds=20), slot=0)
    assert not ticker.tick().run_requests  # on its way to holding its lease
    lease_sync, lease_connection = standby_lease_key("sandbox", 0)
    store.leases.acquire(lease_sync, lease_connection, "standby", dead.run_id, ttl_s=1.0)
    assert not ticker.tick().run_requests  # alive: it holds its lease
    time.sleep(3.5)  # expired beyond the grace: its worker died
    [replacement] = ticker.tick().run_requests
    assert replacement.tags["sync/replaces"] == dead.run_id
    assert replacement.tags["sync/asset_partition"] != first.tags["sync/asset_partition"]  # beside the dead run
    instance.report_run_failed(dead)
    old = standby_run(ticker, instance, limits.webhook_linger_cap - limits.handoff_lead + timedelta(seconds=1), slot=1)
    store.leases.acquire(*standby_lease_key("sandbox", 1), "standby", old.run_id, ttl_s=120)
    [successor] = ticker.tick().run_requests
    assert successor.tags["sync/successor_of"] == old.run_id
    assert successor.tags["sync/asset_partition"] != old.tags["sync/asset_partition"]
