"""Polling schedules: one incremental run per active, registered connection, with stable run keys."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from sync_project.core import SyncDefinition
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG, RunLimits
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, Item, fetch_items


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), ["a", "b", "paused"])
        yield test_instance


def test_schedule_requests_incremental_runs_for_active_registered_connections(instance, store):
    for connection_id in ("a", "b", "paused", "unregistered"):
        store.connections.add("fakeapi", connection_id, config={"base_url": "http://127.0.0.1:9"})
    store.connections.set_status("fakeapi", "paused", "paused")
    defs = build_definitions([ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))
    schedule = defs.resolve_schedule_def("poll_fakeapi__items")
    assert schedule.cron_schedule == "*/5 * * * *"
    tick = datetime(2026, 11, 26, 12, 5, tzinfo=timezone.utc)

    def evaluate() -> list[dg.RunRequest]:
        # Entered, so the instance the context opens is closed here and not by the garbage collector.
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=tick,
            resources={"sync_store": StoreResource(database_url=store.url)},
            repository_def=defs.get_repository_def(),
        ) as context:
            return list(schedule.evaluate_tick(context).run_requests or [])

    requests = evaluate()
    assert sorted(r.partition_key for r in requests) == ["a", "b"]
    request = next(r for r in requests if r.partition_key == "a")
    assert request.run_config["ops"]["fakeapi__items"]["config"]["mode"] == "incremental"
    assert request.tags["sync/asset_partition"] == "fakeapi/items:a:poll"
    # A dead poll keeps the partition's next polls queued for at most this (run monitoring).
    assert request.tags[MAX_RUNTIME_TAG] == "1200"  # 20 min: more than two 5-minute intervals
    assert [r.run_key for r in evaluate()] == [r.run_key for r in requests]  # deterministic per tick


def test_sub_minute_syncs_poll_through_a_sensor(instance, store):
    fast = SyncDefinition(
        provider="fakeapi", name="fast", model=Item, fetch=fetch_items, poll_interval=timedelta(seconds=30)
    )
    assert fast.cron is None
    defs = build_definitions([fast], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))
    sensor = defs.resolve_sensor_def("poll_fakeapi__fast")
    assert sensor.minimum_interval_seconds == 30
    store.connections.add("fakeapi", "a", config={"base_url": "http://127.0.0.1:9"})
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        resources={"sync_store": StoreResource(database_url=store.url)},
        definitions=defs,
    ) as context:
        result = sensor.evaluate_tick(context)
    assert [r.partition_key for r in result.run_requests] == ["a"]
    assert result.run_requests[0].tags[MAX_RUNTIME_TAG] == "1200"


def test_a_poll_may_run_for_two_intervals_of_a_slow_sync():
    hourly = SyncDefinition(
        provider="fakeapi", name="hourly", model=Item, fetch=fetch_items, poll_interval=timedelta(hours=1)
    )
    assert RunLimits().poll_tags(hourly) == {MAX_RUNTIME_TAG: "7200"}
    assert RunLimits(poll_floor=timedelta(hours=3)).poll_max_runtime(hourly) == timedelta(hours=3)


def test_poll_interval_below_thirty_seconds_is_refused():
    with pytest.raises(ValueError, match="below 30 s"):
        SyncDefinition(provider="fakeapi", name="x", model=Item, fetch=fetch_items, poll_interval=timedelta(seconds=5))
