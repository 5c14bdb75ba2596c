"""Sync notifications from real runs on a real Dagster instance, to a consumer served on loopback,
on both store backends."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import dagster as dg
import httpx
import pytest

from sync_project.core.standard_webhooks import generate_secret
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.notifications import NotificationConfigError, NotifierResource
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi
from sync_project_tests.support.consumer import Consumer, closed_port_url, serve

CONNECTION = "acme"
SECRET = generate_secret()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    for n in range(12):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    yield fake


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), [CONNECTION])
        yield test_instance


@pytest.fixture
def connected(store: Store, api: FakeApi) -> Iterator[Store]:
    with BackgroundServer(api.app()) as server:
        store.connections.add("fakeapi", CONNECTION, account_id="acct-1", config={"base_url": server.url})
        yield store


def run(
    store: Store, instance: dg.DagsterInstance, notifier: NotifierResource, mode: str = "incremental"
) -> dg.ExecuteInProcessResult:
    defs = build_definitions(
        [ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url), notifier=notifier
    )
    return defs.resolve_job_def("fakeapi__items_job").execute_in_process(
        instance=instance,
        partition_key=CONNECTION,
        run_config={"ops": {"fakeapi__items": {"config": {"mode": mode}}}},
        raise_on_error=False,
    )


def notifier(url: str, **options: object) -> NotifierResource:
    return NotifierResource(url=url, secret=SECRET, backoff_s=0.01, **options)  # type: ignore[arg-type]


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    [materialization] = result.asset_materializations_for_node("fakeapi__items")
    return {key: value.value for key, value in materialization.metadata.items()}


def warnings_logged(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if entry.level == 30 and entry.dagster_event is None  # logging.WARNING, from context.log
    ]


def test_a_run_that_changed_records_notifies_with_counts_and_a_verifiable_signature(connected, instance, api):
    consumer = Consumer()
    with serve(consumer) as url:
        first = run(connected, instance, notifier(url))
        api.put("item-003", name="renamed")
        api.put("item-100", name="new")
        second = run(connected, instance, notifier(url))
    assert first.success and second.success
    assert len(consumer.received) == 2
    [initial, incremental] = consumer.received
    assert incremental.verified_by(SECRET) == f"sync_{second.run_id}"
    body = incremental.json
    assert body["type"] == "sync" and body["success"] is True and body["error"] is None
    assert (body["provider"], body["sync"], body["model"], body["connection_id"], body["mode"]) == (
        "fakeapi",
        "fakeapi/items",
        "Item",
        CONNECTION,
        "incremental",
    )
    assert body["results"] == {
        "added": 1,
        "updated": 1,
        "deleted": 0,
        "unchanged": 0,
        "skipped_stale": 0,
        "skipped_missing": 0,
    }
    assert initial.json["results"]["added"] == 12
    assert body["records_path"].startswith("/records/fakeapi/items?connection=acme&modified_after=")
    # modified_after finds exactly what the run changed.
    page = connected.changes("fakeapi/items", CONNECTION, modified_after=datetime.fromisoformat(body["modified_after"]))
    assert sorted(change.id for change in page.records) == ["item-003", "item-100"]
    assert materialization_metadata(second)["notification"] == "delivered (HTTP 200, attempt 1)"


def test_a_run_that_changed_nothing_notifies_only_when_every_run_is_asked_for(connected, instance):
    consumer = Consumer()
    with serve(consumer) as url:
        assert run(connected, instance, notifier(url)).success
        quiet = run(connected, instance, notifier(url))
        assert len(consumer.received) == 1
        assert materialization_metadata(quiet)["notification"] == "skipped: nothing changed"
        every = run(connected, instance, notifier(url, every_run=True))
    assert every.success and len(consumer.received) == 2
    assert consumer.received[1].json["results"]["added"] == 0 and consumer.received[1].json["success"] is True


def test_a_failed_run_notifies_its_error_and_still_fails(connected, instance, api):
    consumer = Consumer()
    api.fail_after_pages = 0
    with serve(consumer) as url:
        result = run(connected, instance, notifier(url))
    assert not result.success
    [request] = consumer.received
    body = request.json
    assert body["success"] is False and body["results"] is None
    assert "500" in body["error"]
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.step_failure_data.user_failure_data.metadata["notification"].value.startswith("delivered")


def test_an_endpoint_that_is_down_neither_fails_nor_holds_the_run(connected, instance):
    result = run(connected, instance, notifier(closed_port_url(), max_attempts=3))
    assert result.success
    assert connected.count("fakeapi/items", CONNECTION) == 12
    recorded = materialization_metadata(result)["notification"]
    assert recorded.startswith("failed after 3 attempt(s): ConnectError")
    assert any(
        "sync notification" in message and "failed" in message for message in warnings_logged(instance, result.run_id)
    )


def test_an_endpoint_that_hangs_is_given_up_on_when_the_time_budget_is_spent(connected, instance):
    consumer = Consumer(hang=True)
    with serve(consumer) as url:
        result = run(connected, instance, notifier(url, total_timeout_s=0.5, attempt_timeout_s=5.0, max_attempts=5))
    assert result.success
    assert materialization_metadata(result)["notification"].startswith("failed after")
    assert "time budget spent" in materialization_metadata(result)["notification"]
    assert connected.count("fakeapi/items", CONNECTION) == 12


def test_a_url_without_a_usable_secret_fails_the_notification_not_the_run(connected, instance):
    consumer = Consumer()
    with serve(consumer) as url:
        result = run(connected, instance, NotifierResource(url=url))
    assert result.success and consumer.received == []
    assert materialization_metadata(result)["notification"].startswith("failed, not sent: WebhookSecretError")


def test_the_environment_configures_notifications_by_reference(connected, instance, monkeypatch):
    consumer = Consumer()
    with serve(consumer) as url:
        monkeypatch.setenv("SYNC_NOTIFY_URL", url)
        monkeypatch.setenv("SYNC_NOTIFY_SECRET", SECRET)
        resource = NotifierResource.from_env()
        assert run(connected, instance, resource).success
    [request] = consumer.received
    assert request.verified_by(SECRET)


def test_half_configured_notifications_are_refused_when_the_code_loads():
    assert NotifierResource.from_env({}).url is None
    with pytest.raises(NotificationConfigError, match="SYNC_NOTIFY_SECRET is not"):
        NotifierResource.from_env({"SYNC_NOTIFY_URL": "http://127.0.0.1:1/hook"})
    with pytest.raises(NotificationConfigError, match="whsec_"):
        NotifierResource.from_env({"SYNC_NOTIFY_URL": "http://127.0.0.1:1/hook", "SYNC_NOTIFY_SECRET": "not base64!"})


def test_the_consumer_reads_what_the_run_changed_through_the_records_api(connected, instance, api, monkeypatch):
    from sync_project.receiver.app import create_app

    monkeypatch.setenv("SYNC_RECORDS_API_TOKEN", "consumer-token")
    consumer = Consumer()
    with serve(consumer) as url, BackgroundServer(create_app(connected, providers={}, syncs=[ITEMS])) as receiver:
        assert run(connected, instance, notifier(url)).success
        api.put("item-005", name="changed")
        api.put("item-200", name="added")
        assert run(connected, instance, notifier(url)).success
        notification = consumer.received[-1].json
        response = httpx.get(
            receiver.url + notification["records_path"], headers={"authorization": "Bearer consumer-token"}
        )
    assert response.status_code == 200
    changed = {record["id"]: record["last_action"] for record in response.json()["records"]}
    assert changed == {"item-005": "updated", "item-200": "added"}
