"""Connections have one source of truth, the store's table; Dagster's partitions follow it.

On a real Dagster instance and both store backends: connection_partitions_sensor's requests,
applied as Dagster's sensor daemon applies them, add the partition of a connection added to the
table and delete the partition of one removed; a partition added by hand in Dagster is not a
connection (no poll runs for it) and goes too; the commands' path (reconcile_partitions) makes the
same changes at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import dagster as dg
import pytest

from sync_project.orchestration.connection_partitions import reconcile_partitions
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.store import Store
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER

PARTITIONS = partitions_name("fakeapi")
CONFIG = {"base_url": "http://127.0.0.1:9"}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def defs_for(store: Store) -> dg.Definitions:
    return build_definitions([ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))


def tick(instance: dg.DagsterInstance, store: Store, defs: dg.Definitions) -> dg.SkipReason | list[str]:
    """One evaluation of the sensor, its partition requests applied as the sensor daemon applies
    them; returns what it asked for (``+key`` added, ``-key`` deleted), or its skip reason."""
    sensor = defs.resolve_sensor_def("connection_partitions_sensor")
    with dg.build_sensor_context(
        instance=instance, definitions=defs, resources={"sync_store": StoreResource(database_url=store.url)}
    ) as context:
        data = sensor.evaluate_tick(context)
    asked: list[str] = []
    for request in data.dynamic_partitions_requests or []:
        assert request.partitions_def_name == PARTITIONS
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            asked += [f"+{key}" for key in request.partition_keys]
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
            asked += [f"-{key}" for key in request.partition_keys]
    if not asked:
        return dg.SkipReason(data.skip_message)
    return asked


def test_the_sensor_derives_the_partitions_from_the_connections_table(instance, store):
    defs = defs_for(store)
    sensor = defs.resolve_sensor_def("connection_partitions_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    store.connections.add("fakeapi", "acme", config=CONFIG)
    store.connections.add("fakeapi", "globex", config=CONFIG)
    store.connections.set_status("fakeapi", "globex", "paused")  # paused is still a connection

    assert tick(instance, store, defs) == ["+acme", "+globex"]
    assert sorted(instance.get_dynamic_partitions(PARTITIONS)) == ["acme", "globex"]
    assert isinstance(tick(instance, store, defs), dg.SkipReason)  # nothing left to change

    store.connections.remove("fakeapi", "acme")
    assert tick(instance, store, defs) == ["-acme"]
    assert instance.get_dynamic_partitions(PARTITIONS) == ["globex"]
    # Removed stays removed: nothing in the table asks for it again.
    assert isinstance(tick(instance, store, defs), dg.SkipReason)
    assert instance.get_dynamic_partitions(PARTITIONS) == ["globex"]


def test_a_partition_added_by_hand_in_dagster_is_not_a_connection(instance, store):
    defs = defs_for(store)
    store.connections.add("fakeapi", "acme", config=CONFIG)
    instance.add_dynamic_partitions(PARTITIONS, ["acme", "by-hand"])

    # The schedule polls the table's connections, not Dagster's partitions.
    schedule = defs.resolve_schedule_def("poll_fakeapi__items")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 11, 26, 12, 5, tzinfo=timezone.utc),
        resources={"sync_store": StoreResource(database_url=store.url)},
        repository_def=defs.get_repository_def(),
    ) as context:
        requests = list(schedule.evaluate_tick(context).run_requests or [])
    assert [r.partition_key for r in requests] == ["acme"]

    assert tick(instance, store, defs) == ["-by-hand"]
    assert instance.get_dynamic_partitions(PARTITIONS) == ["acme"]


def test_the_commands_reconcile_their_provider_at_once(instance, store):
    store.connections.add("fakeapi", "acme", config=CONFIG)
    instance.add_dynamic_partitions(PARTITIONS, ["gone"])
    instance.add_dynamic_partitions(partitions_name("other"), ["untouched"])

    [drift] = reconcile_partitions(instance, store, ["fakeapi"])
    assert (drift.provider, drift.missing, drift.orphaned) == ("fakeapi", ("acme",), ("gone",))
    assert instance.get_dynamic_partitions(PARTITIONS) == ["acme"]
    # Only the providers it was given: another provider's partitions are its own business.
    assert instance.get_dynamic_partitions(partitions_name("other")) == ["untouched"]
    assert reconcile_partitions(instance, store, ["fakeapi"]) == []
