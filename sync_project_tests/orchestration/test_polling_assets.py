"""The sync asset on a real Dagster instance, polling a real HTTP API, on both store backends."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dagster as dg
import pytest

from sync_project.orchestration.assets import SyncRunConfig, build_sync_asset, op_name
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.serving import BackgroundServer
from sync_project.store import RecordSpec, Store
from sync_project_tests.orchestration.fake_api import ITEMS, PAGE_SIZE, PROVIDER, FakeApi

CONNECTION = "acme"


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    for n in range(35):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    yield fake


@pytest.fixture
def api_url(api: FakeApi) -> Iterator[str]:
    with BackgroundServer(api.app()) as server:
        yield server.url


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), [CONNECTION, "other"])
        yield test_instance


@pytest.fixture
def connected_store(store: Store, api_url: str) -> Store:
    store.connections.add("fakeapi", CONNECTION, account_id="acct-1", config={"base_url": api_url})
    return store


def materialize(
    instance: dg.DagsterInstance, store: Store, mode: str | None, partition: str = CONNECTION
) -> dg.ExecuteInProcessResult:
    run_config = dg.RunConfig(ops={op_name(ITEMS): SyncRunConfig(mode=mode)}) if mode else None
    return dg.materialize(
        [build_sync_asset(ITEMS, PROVIDER)],
        partition_key=partition,
        instance=instance,
        resources={"sync_store": StoreResource(database_url=store.url)},
        run_config=run_config,
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    [materialization] = result.asset_materializations_for_node(op_name(ITEMS))
    return {key: value.value for key, value in materialization.metadata.items()}


def live(store: Store) -> dict[str, dict]:
    frame = store.dataframe(ITEMS.key, CONNECTION)
    return {row["id"]: row for row in frame[["id", "name", "updated_at"]].to_dict("records")}


def truth(api: FakeApi) -> dict[str, dict]:
    return {key: {"id": key, "name": item["name"], "updated_at": item["updated_at"]} for key, item in api.items.items()}


def test_full_refresh_is_the_default_and_reports_counts(instance, connected_store, api):
    result = materialize(instance, connected_store, mode=None)
    assert result.success
    meta = metadata(result)
    assert meta["mode"] == "full"
    assert meta["added"] == 35 and meta["updated"] == 0 and meta["deleted"] == 0
    assert meta["pages"] == 4
    assert meta["dagster/row_count"] == 35
    assert live(connected_store) == truth(api)


def test_incremental_reads_from_the_checkpoint(instance, connected_store, api):
    assert materialize(instance, connected_store, "incremental").success
    api.put("item-003", name="renamed")
    api.put("item-100", name="new")
    served_before = api.pages_served
    result = materialize(instance, connected_store, "incremental")
    assert result.success
    meta = metadata(result)
    assert (meta["added"], meta["updated"], meta["unchanged"]) == (1, 1, 0)
    assert api.pages_served - served_before == 1  # only what changed since the checkpoint
    assert live(connected_store) == truth(api)
    state = connected_store.state.get(ITEMS.key, CONNECTION)
    assert state is not None and state.last_error is None and state.last_mode == "incremental"
    assert state.checkpoint == {"updated_after": api.items["item-100"]["updated_at"]}


def test_a_run_killed_after_page_k_resumes_without_loss(instance, connected_store, api):
    api.fail_after_pages = 2
    failed = materialize(instance, connected_store, "incremental")
    assert not failed.success
    assert connected_store.count(ITEMS.key, CONNECTION) == 2 * PAGE_SIZE  # pages 1..k committed
    api.fail_after_pages = None
    served_before = api.pages_served
    resumed = materialize(instance, connected_store, "incremental")
    assert resumed.success
    assert api.pages_served - served_before == 2  # pages 3 and 4 only
    assert metadata(resumed)["added"] == 35 - 2 * PAGE_SIZE
    assert live(connected_store) == truth(api)


def test_full_refresh_tombstones_exactly_the_vanished_records(instance, connected_store, api):
    assert materialize(instance, connected_store, "full").success
    api.remove("item-004")
    api.remove("item-030")
    result = materialize(instance, connected_store, "full")
    assert result.success
    assert metadata(result)["deleted"] == 2
    assert live(connected_store) == truth(api)
    gone = connected_store.get(ITEMS.key, CONNECTION, "item-004")
    assert gone is not None and gone.last_action == "deleted" and gone.data["name"] == "Item 4"


def test_a_record_written_after_the_full_refresh_started_survives_it(instance, connected_store, api):
    assert materialize(instance, connected_store, "full").success
    spec = RecordSpec(primary_key="id", updated_field="updated_at", strategy="newest_source_wins")

    second_page = api.pages_served + 2

    def webhook_arrives(page: int) -> None:
        # A webhook run writes a record the refresh's listing will not contain (created after the
        # listing passed its position) while the refresh is under way.
        if page == second_page:
            connected_store.save(
                ITEMS.key, CONNECTION, spec, [{"id": "late", "name": "late", "updated_at": "2026-06-01T00:00:00+00:00"}]
            )

    api.on_page = webhook_arrives
    result = materialize(instance, connected_store, "full")
    assert result.success
    assert metadata(result)["deleted"] == 0
    assert connected_store.get(ITEMS.key, CONNECTION, "late").deleted_at is None


def test_a_failed_full_refresh_deletes_nothing(instance, connected_store, api):
    assert materialize(instance, connected_store, "full").success
    api.remove("item-001")
    api.fail_after_pages = api.pages_served + 2
    result = materialize(instance, connected_store, "full")
    assert not result.success
    assert connected_store.count(ITEMS.key, CONNECTION) == 35
    assert connected_store.get(ITEMS.key, CONNECTION, "item-001").deleted_at is None
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    left_open = {k: v.value for k, v in failure.step_failure_data.user_failure_data.metadata.items()}
    assert (left_open["full_refresh_open"], left_open["full_refresh_pages"]) == (True, 2)

    # The next full run resumes at page 3 and, the window complete, tombstones what vanished.
    api.fail_after_pages = None
    resumed = materialize(instance, connected_store, "full")
    assert resumed.success
    meta = metadata(resumed)
    assert (meta["pages"], meta["full_refresh_pages"], meta["full_refresh_resumed_runs"]) == (2, 4, 1)
    assert meta["deleted_unseen"] == 1 and meta["full_refresh_started_at"] == left_open["full_refresh_started_at"]
    assert connected_store.get(ITEMS.key, CONNECTION, "item-001").last_action == "deleted"


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    [event] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return str(event.step_failure_data.error)


def test_unknown_connection_fails_naming_it(instance, connected_store):
    result = materialize(instance, connected_store, "full", partition="other")
    assert not result.success
    assert "no connection 'other' for provider 'fakeapi'" in failure_message(result)


def test_paused_connection_fails_naming_it(instance, connected_store):
    connected_store.connections.set_status("fakeapi", CONNECTION, "paused")
    result = materialize(instance, connected_store, "incremental")
    assert not result.success
    assert "is paused" in failure_message(result)
    assert connected_store.count(ITEMS.key, CONNECTION) == 0


@pytest.mark.parametrize("fault", ["http_500", "garbage"])
def test_provider_faults_fail_the_run_and_leave_the_store_unchanged(instance, connected_store, api, fault):
    assert materialize(instance, connected_store, "full").success
    before = connected_store.changes(ITEMS.key, CONNECTION, limit=100).records
    api.put("item-002", name="changed")
    if fault == "http_500":
        api.fail_after_pages = api.pages_served
    else:
        api.garbage = True
    result = materialize(instance, connected_store, "incremental")
    assert not result.success
    message = failure_message(result)
    assert ("HTTP 500" in message) if fault == "http_500" else ("not JSON" in message)
    assert connected_store.changes(ITEMS.key, CONNECTION, limit=100).records == before
    state = connected_store.state.get(ITEMS.key, CONNECTION)
    assert state is not None and state.last_error


def test_a_poll_waits_for_the_partitions_poll_lease_then_gives_up_naming_its_holder(instance, connected_store, api):
    with connected_store.leases.hold(ITEMS.key, CONNECTION, "poll", "other-run", ttl_s=5):
        run_config = dg.RunConfig(ops={op_name(ITEMS): SyncRunConfig(mode="full", poll_lease_wait_s=1.0)})
        result = dg.materialize(
            [build_sync_asset(ITEMS, PROVIDER)],
            partition_key=CONNECTION,
            instance=instance,
            resources={"sync_store": StoreResource(database_url=connected_store.url)},
            run_config=run_config,
            raise_on_error=False,
        )
    assert not result.success
    assert "another run (other-run) holds the poll lease of fakeapi/items for connection 'acme'" in failure_message(
        result
    )
    assert "waited 1 s and did nothing" in failure_message(result)
    assert connected_store.count(ITEMS.key, CONNECTION) == 0


def test_a_poll_proceeds_while_the_drain_lease_is_held(instance, connected_store, api):
    with connected_store.leases.hold(ITEMS.key, CONNECTION, "drain", "webhook-run", ttl_s=5):
        result = materialize(instance, connected_store, "full")
    assert result.success
    assert connected_store.count(ITEMS.key, CONNECTION) == 35


def test_a_backfill_waits_for_a_running_poll_of_its_partition_and_then_runs(instance, connected_store, api):
    lease = connected_store.leases.acquire(ITEMS.key, CONNECTION, "poll", "scheduled-run", ttl_s=30)
    releaser = threading.Timer(1.0, connected_store.leases.release, args=(lease,))
    releaser.start()
    try:
        result = materialize(instance, connected_store, "full")
    finally:
        releaser.join()
    assert result.success
    assert live(connected_store) == truth(api)
