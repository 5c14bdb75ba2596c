"""The inbox sensor's decisions, tick by tick, against a real store and a real Dagster instance."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import pytest

from sync_project import registry
from sync_project.orchestration.assets import SyncRunConfig
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG, RunLimits
from sync_project.orchestration.sensors import DEFAULT_STALL_AFTER_S, InboxSensorCursor, retry_delay_s
from sync_project.store import RoutedEvent, Store
from sync_project_tests.support.realtime import sandbox_syncs


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


class Ticker:
    def __init__(
        self, store: Store, instance: dg.DagsterInstance, stall_after_s: float = 3600.0, sensor: str = "inbox_sensor"
    ) -> None:
        self.store, self.instance, self.cursor, self.sensor = store, instance, None, sensor
        self.defs = build_definitions(
            sandbox_syncs(),
            registry.providers(),
            store=StoreResource(database_url=store.url),
            inbox_stall_after_s=stall_after_s,
            webhook_linger_s=0.0,
        )

    def tick(self) -> dg.SensorExecutionData:
        # Entered: the store resource is set up for the tick and closed after it.
        with dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            cursor=self.cursor,
            definitions=self.defs,
            resources={"sync_store": StoreResource(database_url=self.store.url)},
        ) as context:
            data = self.defs.resolve_sensor_def(self.sensor).evaluate_tick(context)
            self.cursor = data.cursor if data.cursor is not None else context.cursor
        return data


def deliver(store: Store, key: str, connection_id: str = "c1", sync: str = "sandbox/contacts") -> None:
    store.inbox.receive(
        "sandbox",
        [
            RoutedEvent(
                event_key=key,
                event_type="contact.updated",
                account_id="a1",
                payload={"id": key},
                sync=sync,
                connection_id=connection_id,
            )
        ],
    )


def test_no_events_no_runs(store, instance):
    data = Ticker(store, instance).tick()
    assert not data.run_requests
    assert "no due inbox events" in (data.skip_message or "")


def test_run_keys_follow_the_inbox_high_water_mark(store, instance):
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    deliver(store, "e1")
    deliver(store, "e2")
    deliver(store, "e3", sync="sandbox/deals")
    first = ticker.tick()
    keys = sorted(r.run_key for r in first.run_requests)
    assert keys == ["inbox|sandbox/contacts|c1|2|0", "inbox|sandbox/deals|c1|3|0"]
    request = next(r for r in first.run_requests if "contacts" in r.run_key)
    assert request.partition_key == "c1" and request.job_name == "sandbox__contacts_job"
    assert request.run_config["ops"]["sandbox__contacts"]["config"]["mode"] == "webhook"
    assert request.tags["sync/asset_partition"] == "sandbox/contacts:c1:drain"
    # The partition did not exist in the instance: the same tick adds it.
    assert [list(r.partition_keys) for r in first.dynamic_partitions_requests] == [["c1"]]
    # Same pending work, same keys: Dagster will not launch them twice.
    assert sorted(r.run_key for r in ticker.tick().run_requests) == keys
    deliver(store, "e4")
    assert "inbox|sandbox/contacts|c1|4|0" in {r.run_key for r in ticker.tick().run_requests}
    cursor = InboxSensorCursor.model_validate_json(ticker.cursor)
    assert cursor.high_water_mark == 4


def test_paused_connections_and_waiting_runs_are_skipped(store, instance):
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    store.connections.add("sandbox", "c2", account_id="a2")
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1", "c2"])
    deliver(store, "e1", "c1")
    deliver(store, "e2", "c2")
    store.connections.set_status("sandbox", "c2", "paused")
    assert [r.partition_key for r in ticker.tick().run_requests] == ["c1"]
    # A queued webhook run of c1 will claim whatever arrives before it starts.
    job = ticker.defs.resolve_job_def("sandbox__contacts_job")
    instance.create_run_for_job(
        job,
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={"sync/mode": "webhook", "sync/asset_partition": "sandbox/contacts:c1:drain"},
    )
    deliver(store, "e3", "c1")
    assert ticker.tick().run_requests == []


def test_a_removed_connection_with_pending_events_launches_nothing(store, instance):
    ticker = Ticker(store, instance, stall_after_s=0.0)  # no back-off: every tick would re-request
    store.connections.add("sandbox", "c1", account_id="a1")
    store.connections.add("sandbox", "c2", account_id="a2")
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1", "c2"])
    deliver(store, "e1", "c1")
    deliver(store, "e2", "c1", sync="sandbox/deals")
    assert {r.partition_key for r in ticker.tick().run_requests} == {"c1"}
    assert store.connections.remove("sandbox", "c1") == 2
    instance.delete_dynamic_partition(partitions_name("sandbox"), "c1")  # as `connections remove` does
    # A receiver that routed from a snapshot taken before the removal still queues one for it.
    deliver(store, "e3", "c1")
    deliver(store, "e4", "c2")
    for tick in range(3):
        data = ticker.tick()
        assert {r.partition_key for r in data.run_requests} == {"c2"}, f"tick {tick}"
        assert all("c1" not in r.partition_keys for r in data.dynamic_partitions_requests)
    assert not instance.has_dynamic_partition(partitions_name("sandbox"), "c1")
    assert sorted(e.event_key for e in store.inbox.events(status="orphaned")) == ["e1", "e2", "e3"]
    # Added back, its events are its work again, under keys the sensor has not requested before.
    store.connections.add("sandbox", "c1", account_id="a1")
    requests = {r.run_key: r for r in ticker.tick().run_requests if r.partition_key == "c1"}
    assert {r.job_name for r in requests.values()} == {"sandbox__contacts_job", "sandbox__deals_job"}
    assert all(key.count("|") == 5 for key in requests)  # a requeue time in the key


def test_a_stalled_partition_is_requested_again_under_a_new_key(store, instance):
    ticker = Ticker(store, instance, stall_after_s=0.0)
    store.connections.add("sandbox", "c1", account_id="a1")
    deliver(store, "e1")
    first = ticker.tick().run_requests[0].run_key
    second = ticker.tick().run_requests[0].run_key
    assert first == "inbox|sandbox/contacts|c1|1|0" and second == f"{first}|again1"
    state = json.loads(ticker.cursor)["requested"]["sandbox/contacts|c1"]
    assert state["retries"] == 1


def pass_time(ticker: Ticker, partition: str, seconds: float) -> None:
    """As if ``seconds`` had passed since the partition's last request (the cursor is the sensor's
    only clock)."""
    cursor = InboxSensorCursor.model_validate_json(ticker.cursor)
    cursor.requested[partition].requested_at -= seconds
    ticker.cursor = cursor.model_dump_json()


def test_a_partition_whose_run_ended_with_its_events_due_is_requested_again(store, instance):
    ticker = Ticker(store, instance, stall_after_s=DEFAULT_STALL_AFTER_S)
    store.connections.add("sandbox", "c1", account_id="a1")
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1"])
    deliver(store, "e1")
    [request] = ticker.tick().run_requests
    job = ticker.defs.resolve_job_def("sandbox__contacts_job")
    run = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.STARTED, tags={**request.tags, "dagster/run_key": request.run_key}
    )
    assert ticker.tick().run_requests == []  # draining (or so Dagster says): left to it
    # Run monitoring fails it (its worker died before committing): the events are due, unchanged.
    instance.report_run_failed(run)
    pass_time(ticker, "sandbox/contacts|c1", 30)
    [again] = ticker.tick().run_requests
    assert again.run_key == f"{request.run_key}|again1"  # a key Dagster has not used yet
    # Its run ends at once with the events still due (say, another run held the partition):
    # the same key during the back-off (Dagster skips it), a new one after it, waits doubling.
    waits = []
    for retry in range(2, 9):
        assert [r.run_key for r in ticker.tick().run_requests] == [f"{request.run_key}|again{retry - 1}"]
        wait = retry_delay_s(retry - 1, DEFAULT_STALL_AFTER_S)
        pass_time(ticker, "sandbox/contacts|c1", wait)
        assert [r.run_key for r in ticker.tick().run_requests] == [f"{request.run_key}|again{retry}"]
        waits.append(wait)
    assert waits == [10.0, 20.0, 40.0, 80.0, 120.0, 120.0, 120.0]  # capped at stall_after_s
    # New events: a new key, and the back-off starts over.
    deliver(store, "e2")
    assert [r.run_key for r in ticker.tick().run_requests] == ["inbox|sandbox/contacts|c1|2|0"]


def test_webhook_runs_carry_their_time_limit_and_linger_cap(store, instance):
    ticker = Ticker(store, instance)
    store.connections.add("sandbox", "c1", account_id="a1")
    deliver(store, "e1")
    [request] = ticker.tick().run_requests
    limits = RunLimits()
    # Its successor's longest wait for the lease (105 s), the cap (600 s), the margin (75 s).
    assert request.tags[MAX_RUNTIME_TAG] == "780" == str(int(limits.webhook_max_runtime.total_seconds()))
    config = request.run_config["ops"]["sandbox__contacts"]["config"]
    # The run stops claiming after its linger cap, well before run monitoring would end it.
    assert config["max_linger_run_s"] == limits.webhook_linger_cap.total_seconds() == 600.0
    # A first drainer does not wait for a live one; only a successor does.
    assert config["handoff_wait_s"] == 0.0
    assert SyncRunConfig.model_validate(config).mode == "webhook"
