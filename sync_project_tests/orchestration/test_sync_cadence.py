"""Per-connection cadence on a real Dagster instance: the poll schedule and the per-connection
sensor evaluated for real, their run requests executed as runs.

- A delete whose webhook was lost (the fake API sends none) survives incremental polls; the tick
  after the sync's full-refresh cadence elapsed requests a full refresh instead, and that run
  tombstones it. Until the next cadence, ticks poll incrementally again.
- A connection's own poll interval takes it off the sync's schedule and onto
  ``poll_per_connection``, which polls it once per slot of that interval; the freshness check
  measures it against that interval.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from click.testing import CliRunner

from sync_project.cli import connection_status as view
from sync_project.cli import main
from sync_project.orchestration.checks import CheckSettings, evaluate_freshness
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.schedules import PER_CONNECTION_SENSOR, per_connection_requests
from sync_project.serving import BackgroundServer
from sync_project.store import LastRun, Store
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    for n in range(25):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    with BackgroundServer(fake.app()) as server:
        yield fake, server.url


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), ["acme", "fast", "slow"])
        yield test_instance


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, store: Store, at: datetime) -> list[dg.RunRequest]:
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=at,
        resources={"sync_store": StoreResource(database_url=store.url)},
        repository_def=defs.get_repository_def(),
    ) as context:
        return list(defs.resolve_schedule_def("poll_fakeapi__items").evaluate_tick(context).run_requests or [])


def execute(defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """The run the daemon would launch for ``request``: its job, partition, config and tags."""
    return defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        tags=request.tags,
        raise_on_error=False,
    )


def modes(requests: list[dg.RunRequest]) -> dict[str, str]:
    return {r.partition_key: r.run_config["ops"]["fakeapi__items"]["config"]["mode"] for r in requests}


def test_a_full_refresh_by_cadence_heals_a_delete_whose_webhook_was_lost(store, api, instance) -> None:
    fake, url = api
    store.connections.add("fakeapi", "acme", config={"base_url": url})
    defs = build_definitions([ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))
    start = store.connections.get("fakeapi", "acme").created_at.replace(second=0, microsecond=0)

    first = tick(defs, instance, store, start + timedelta(minutes=5))
    assert modes(first) == {"acme": "incremental"}
    assert execute(defs, instance, first[0]).success
    assert store.count(ITEMS.key, "acme") == 25

    fake.remove("item-007")  # deleted at the provider; its webhook never arrives
    polled = tick(defs, instance, store, start + timedelta(hours=6))
    assert modes(polled) == {"acme": "incremental"}
    assert execute(defs, instance, polled[0]).success
    assert store.get(ITEMS.key, "acme", "item-007").deleted_at is None  # incremental polls cannot see it

    due = tick(defs, instance, store, start + ITEMS.full_refresh_interval + timedelta(minutes=5))
    assert modes(due) == {"acme": "full"} and due[0].tags["sync/full_refresh"] == "cadence"
    assert due[0].tags["sync/mode"] == "full" and due[0].tags["dagster/max_runtime"] == "7200"
    healed = execute(defs, instance, due[0])
    assert healed.success
    assert store.get(ITEMS.key, "acme", "item-007").last_action == "deleted"
    [materialization] = healed.asset_materializations_for_node("fakeapi__items")
    meta = {key: value.value for key, value in materialization.metadata.items()}
    assert (meta["deleted_unseen"], meta["full_refresh_pages"], meta["full_refresh_resumed_runs"]) == (1, 3, 0)

    # The cadence counts from that refresh: the ticks of the next day are incremental polls again.
    refreshed_at = store.state.get(ITEMS.key, "acme").last_full_refresh_at
    [status] = view.partition_statuses(store, instance, defs, [ITEMS], store.connections.list("fakeapi"))
    assert status.full_refresh.next_due_at == refreshed_at + ITEMS.full_refresh_interval
    assert view.full_refresh_text(status.full_refresh, refreshed_at).startswith("every 1 d 0 h; last 0 s ago, due ")
    assert modes(tick(defs, instance, store, refreshed_at + timedelta(hours=23))) == {"acme": "incremental"}
    assert modes(tick(defs, instance, store, refreshed_at + timedelta(hours=24, minutes=5))) == {"acme": "full"}
    store.connections.configure("fakeapi", "acme", full_refresh_interval_s=0)  # never, for this one
    assert modes(tick(defs, instance, store, refreshed_at + timedelta(days=5))) == {"acme": "incremental"}


def test_a_connections_own_poll_interval_is_honoured_by_the_sensor(store, api, instance) -> None:
    _, url = api
    store.connections.add("fakeapi", "acme", config={"base_url": url})
    store.connections.add("fakeapi", "fast", config={"base_url": url}, poll_interval_s=60)
    store.connections.add("fakeapi", "slow", config={"base_url": url})
    store.connections.configure("fakeapi", "slow", poll_interval_s=3600)
    defs = build_definitions([ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))
    now = datetime.now(timezone.utc)

    # The sync's schedule (every 5 min) polls only the connection without an interval of its own.
    assert modes(tick(defs, instance, store, now)) == {"acme": "incremental"}

    sensor = defs.resolve_sensor_def(PER_CONNECTION_SENSOR)
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        definitions=defs,
        resources={"sync_store": StoreResource(database_url=store.url)},
    ) as context:
        requested = sensor.evaluate_tick(context).run_requests
        assert sorted(modes(requested)) == ["fast", "slow"]
        [fast] = [r for r in requested if r.partition_key == "fast"]
        assert execute(defs, instance, fast).success
        assert store.count(ITEMS.key, "fast") == 25

        def keys(at: datetime) -> dict[str, str]:
            requests = per_connection_requests(context, [ITEMS], context.resources.sync_store, None, at)
            return {r.partition_key: r.run_key for r in requests}

        minute = datetime(2026, 11, 26, 12, 0, 10, tzinfo=timezone.utc)
        # Within one slot the keys repeat (Dagster launches a run key once): one poll per interval.
        assert keys(minute) == keys(minute + timedelta(seconds=45))
        assert keys(minute + timedelta(seconds=60))["fast"] != keys(minute)["fast"]  # the next minute: again
        assert keys(minute + timedelta(seconds=60))["slow"] == keys(minute)["slow"]  # the hour is not over
        assert keys(minute + timedelta(hours=1))["slow"] != keys(minute)["slow"]

    # `connections list` shows the intervals.
    runner = CliRunner()
    listed = runner.invoke(main, ["connections", "list"], env={"SYNC_DATABASE_URL": store.url})
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[1]: line for line in listed.output.splitlines()}
    assert "poll=1m" in lines["fast"] and "poll=1h" in lines["slow"] and "poll=default" in lines["acme"]
    set_back = runner.invoke(
        main,
        ["connections", "set", "fakeapi", "slow", "--poll-interval", "default"],
        env={"SYNC_DATABASE_URL": store.url},
    )
    assert set_back.exit_code == 0 and "poll=default" in set_back.output, set_back.output
    refused = runner.invoke(
        main, ["connections", "set", "fakeapi", "fast", "--poll-interval", "10s"], env={"SYNC_DATABASE_URL": store.url}
    )
    assert refused.exit_code != 0 and "at least 30 s" in refused.output and "Traceback" not in refused.output


def test_freshness_uses_the_connections_own_interval(store) -> None:
    store.connections.add("fakeapi", "acme")
    store.connections.add("fakeapi", "fast", poll_interval_s=60)
    now = datetime.now(timezone.utc)
    six_minutes_ago = now - timedelta(minutes=6)
    runs = {cid: LastRun(connection_id=cid, last_success_at=six_minutes_ago) for cid in ("acme", "fast")}
    outcome = evaluate_freshness(ITEMS, store.connections.list("fakeapi"), runs, CheckSettings(), now)
    # 6 min: fine for a 5-minute poll (warn at 10), three intervals late for a 1-minute one.
    assert not outcome.passed and outcome.severity == dg.AssetCheckSeverity.ERROR
    assert "fast (360 s" in outcome.description and "acme" not in outcome.description
    assert "| fast | 360 (synced) | ERROR |" in outcome.metadata["by_connection"].value
