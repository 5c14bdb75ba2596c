"""Asset checks on a real Dagster instance, over a real store (both backends): each run reports its
partition's inbox backlog and dead letters; the scheduled checks judge every connection."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from sqlalchemy import update

from sync_project.core import Save
from sync_project.orchestration.checks import CHECKS_JOB, CheckSettings, DrainRun, why_not_draining
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.notifications import NotifierResource
from sync_project.orchestration.partitions import drain_tags, partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project.store.inbox import RoutedEvent
from sync_project.store.schema import connections, inbox
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi

ASSET = dg.AssetKey(["fakeapi", "items"])
SYNC = replace(
    ITEMS,
    webhook_events=("item.updated",),
    on_webhook=lambda ctx, event: [Save(event.payload)],
)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), ["acme", "globex"])
        yield test_instance


@pytest.fixture
def connected(store: Store) -> Iterator[Store]:
    api = FakeApi()
    api.put("item-001", name="one")
    with BackgroundServer(api.app()) as server:
        for connection_id in ("acme", "globex"):
            store.connections.add("fakeapi", connection_id, account_id=connection_id, config={"base_url": server.url})
        yield store


def definitions(store: Store) -> dg.Definitions:
    return build_definitions(
        [SYNC], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url), notifier=NotifierResource(),
        check_settings=CheckSettings(backlog_max_wait=timedelta(minutes=5)),
    )


def sync_run(store: Store, instance: dg.DagsterInstance, connection_id: str = "acme", mode: str = "incremental") -> dict[str, dg.AssetCheckEvaluation]:
    result = definitions(store).resolve_job_def("fakeapi__items_job").execute_in_process(
        instance=instance, partition_key=connection_id,
        run_config={"ops": {"fakeapi__items": {"config": {"mode": mode}}}},
    )
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def scheduled_checks(store: Store, instance: dg.DagsterInstance) -> dict[str, dg.AssetCheckEvaluation]:
    result = definitions(store).resolve_job_def(CHECKS_JOB).execute_in_process(instance=instance)
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def receive(store: Store, key: str, connection_id: str, *, received_ago: timedelta = timedelta(0)) -> int:
    store.inbox.receive("fakeapi", [RoutedEvent(event_key=key, event_type="item.updated", account_id=connection_id,
                                                payload={"id": key, "name": key, "updated_at": "2026-02-01T00:00:00Z"},
                                                sync="fakeapi/items", connection_id=connection_id)])
    [event] = store.inbox.events(event_key=key, connection_id=connection_id)
    if received_ago:
        with store.engine.begin() as conn:
            conn.execute(update(inbox).where(inbox.c.id == event.id).values(received_at=datetime.now(timezone.utc) - received_ago))
    return event.id


def kill(store: Store, event_id: int, error: str) -> None:
    assert store.inbox.mark_failed(event_id, error, max_attempts=1) == "dead"


def values(evaluation: dg.AssetCheckEvaluation) -> dict[str, object]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def test_every_run_reports_its_partitions_checks(connected, instance):
    checks = sync_run(connected, instance)
    assert set(checks) == {"inbox_backlog", "dead_letters"}  # the all-connections checks are not run
    assert all(e.passed and e.partition == "acme" for e in checks.values())
    assert values(checks["inbox_backlog"])["pending"] == 0


def test_an_event_waiting_too_long_warns_and_a_webhook_run_clears_it(connected, instance):
    receive(connected, "late", "acme", received_ago=timedelta(minutes=12))
    receive(connected, "fresh", "acme")
    receive(connected, "elsewhere", "globex", received_ago=timedelta(hours=1))
    polled = sync_run(connected, instance, mode="incremental")["inbox_backlog"]
    assert not polled.passed and polled.severity == dg.AssetCheckSeverity.WARN
    meta = values(polled)
    assert (meta["pending"], meta["due"], meta["retrying"]) == (2, 2, 0)  # acme's only
    assert meta["oldest_due_age_s"] >= 12 * 60
    assert "acme" in (polled.description or "")

    drained = sync_run(connected, instance, mode="webhook")["inbox_backlog"]
    assert drained.passed and values(drained)["pending"] == 0
    assert connected.get("fakeapi/items", "acme", "late") is not None


def test_an_event_waiting_for_its_retry_is_reported_but_does_not_warn(connected, instance):
    event_id = receive(connected, "flaky", "acme", received_ago=timedelta(minutes=30))
    connected.inbox.mark_failed(event_id, "boom", max_attempts=5, base_delay_s=3600)
    check = sync_run(connected, instance)["inbox_backlog"]
    assert check.passed
    assert (values(check)["pending"], values(check)["retrying"], values(check)["due"]) == (1, 1, 0)


def test_dead_letters_fail_with_error_for_their_partition_only(connected, instance):
    kill(connected, receive(connected, "poison-1", "acme"), "ValueError: first")
    kill(connected, receive(connected, "poison-2", "acme"), "KeyError: 'name'")
    check = sync_run(connected, instance, "acme")["dead_letters"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    meta = values(check)
    assert meta["dead"] == 2 and meta["newest_error"] == "KeyError: 'name'"
    assert meta["newest_dead_event_type"] == "item.updated"
    assert sync_run(connected, instance, "globex")["dead_letters"].passed

    assert connected.inbox.replay("dead", connections=connected.connections) == 2
    assert sync_run(connected, instance, "acme", mode="webhook")["dead_letters"].passed


def test_scheduled_freshness_judges_every_active_connection(connected, instance):
    interval = SYNC.poll_interval
    fresh = scheduled_checks(connected, instance)["connections_fresh"]
    assert fresh.passed  # registered just now: within the window for a first sync
    assert values(fresh)["active_connections"] == 2

    now = datetime.now(timezone.utc)
    connected.state.record_run("fakeapi/items", "acme", run_id="r1", mode="incremental", succeeded_at=now - interval * 2.5)
    connected.state.record_run("fakeapi/items", "globex", run_id="r2", mode="incremental", succeeded_at=now)
    warn = scheduled_checks(connected, instance)["connections_fresh"]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert values(warn)["late_warn"] == 1 and values(warn)["late_error"] == 0
    assert "acme" in (warn.description or "")

    connected.state.record_run("fakeapi/items", "acme", run_id="r3", mode="incremental", succeeded_at=now - interval * 4)
    error = scheduled_checks(connected, instance)["connections_fresh"]
    assert not error.passed and error.severity == dg.AssetCheckSeverity.ERROR

    connected.connections.set_status("fakeapi", "acme", "paused")  # not expected to sync
    paused = scheduled_checks(connected, instance)["connections_fresh"]
    assert paused.passed and values(paused)["paused_connections"] == 1


def test_a_connection_that_never_synced_is_late_once_its_window_has_passed(connected, instance):
    with connected.engine.begin() as conn:
        conn.execute(update(connections).where(connections.c.connection_id == "globex")
                     .values(created_at=datetime.now(timezone.utc) - timedelta(hours=2)))
    sync_run(connected, instance, "acme")
    check = scheduled_checks(connected, instance)["connections_fresh"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "globex" in (check.description or "") and "never synced" in (check.description or "")


def test_scheduled_inbox_check_sees_every_connection(connected, instance):
    checks = scheduled_checks(connected, instance)
    assert checks["inbox_healthy"].passed
    receive(connected, "stuck", "globex", received_ago=timedelta(minutes=10))
    stuck = scheduled_checks(connected, instance)["inbox_healthy"]
    assert not stuck.passed and stuck.severity == dg.AssetCheckSeverity.WARN
    kill(connected, receive(connected, "poison", "acme"), "TypeError: nope")
    dead = scheduled_checks(connected, instance)["inbox_healthy"]
    assert not dead.passed and dead.severity == dg.AssetCheckSeverity.ERROR
    assert values(dead)["dead"] == 1 and values(dead)["pending"] == 1
    assert "TypeError: nope" in (dead.description or "")


def test_the_asset_carries_a_freshness_policy_of_its_poll_interval():
    defs = build_definitions([SYNC], {"fakeapi": PROVIDER}, notifier=NotifierResource())
    policy = defs.resolve_assets_def(ASSET).specs_by_key[ASSET].freshness_policy
    assert policy.fail_window.to_timedelta() == SYNC.poll_interval * 3
    assert policy.warn_window.to_timedelta() == SYNC.poll_interval * 2
    schedule = defs.resolve_schedule_def("sync_checks_schedule")
    assert schedule.job_name == CHECKS_JOB and schedule.default_status == dg.DefaultScheduleStatus.RUNNING


@pytest.mark.parametrize(
    "settings",
    [{"backlog_max_wait": timedelta(0)}, {"freshness_warn_factor": 3.0, "freshness_fail_factor": 2.0}, {"freshness_warn_factor": 0.5}],
)
def test_nonsense_thresholds_are_refused(settings):
    with pytest.raises(ValueError):
        CheckSettings(**settings)


def drain_run(store: Store, instance: dg.DagsterInstance, connection_id: str, *, started_ago: timedelta | None) -> dg.DagsterRun:
    """A webhook run of the partition as the inbox sensor requests it; started ``started_ago``."""
    job = definitions(store).resolve_job_def("fakeapi__items_job")
    run = instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**drain_tags("fakeapi/items", connection_id), "sync/mode": "webhook", MAX_RUNTIME_TAG: "135"},
    )
    if started_ago is not None:
        started = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name)
        instance.report_dagster_event(started, run.run_id, timestamp=(datetime.now(timezone.utc) - started_ago).timestamp())
    return instance.get_run_by_id(run.run_id)


def test_the_scheduled_check_names_a_connection_that_is_not_draining_and_why(connected, instance):
    receive(connected, "stuck", "globex", received_ago=timedelta(minutes=10))

    def description() -> str:
        check = scheduled_checks(connected, instance)["inbox_healthy"]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert values(check)["connections_not_draining"] + values(check)["connections_behind"] == 1
        return check.description or ""

    assert "globex" in description() and "no webhook run was ever requested" in description()

    queued = drain_run(connected, instance, "globex", started_ago=None)
    assert f"its webhook run {queued.run_id[:8]} has been queued" in description()

    # Its worker and code server died 9 minutes ago; run monitoring should have failed it at 135 s.
    dead = drain_run(connected, instance, "globex", started_ago=timedelta(minutes=9))
    text = description()
    assert f"{dead.run_id[:8]} has been STARTED for 54" in text  # 540 s
    assert "beyond its dagster/max_runtime of 135 s" in text and "run monitoring has not failed it" in text

    instance.report_run_failed(dead)
    assert f"its last webhook run {dead.run_id[:8]} ended FAILURE" in description()

    # A run that started a minute ago drains it: the partition is behind, not stuck.
    drain_run(connected, instance, "globex", started_ago=timedelta(minutes=1))
    check = scheduled_checks(connected, instance)["inbox_healthy"]
    assert values(check)["connections_behind"] == 1 and "draining but behind" in (check.description or "")


def test_a_run_s_own_backlog_check_says_what_to_look_for(connected, instance):
    receive(connected, "late", "acme", received_ago=timedelta(minutes=12))
    check = sync_run(connected, instance, mode="incremental")["inbox_backlog"]
    text = check.description or ""
    assert "acme" in text and "not draining" in text
    # The run reads its own instance, so the cause is named: no webhook run was ever requested.
    assert "no webhook run was ever requested" in text and "inbox_sensor" in text and "dagster-daemon" in text


def test_a_stuck_run_within_its_time_limit_is_named_as_possibly_dead():
    now = datetime.now(timezone.utc)
    run = DrainRun("0123456789", dg.DagsterRunStatus.STARTED, now - timedelta(minutes=6), max_runtime_s=3600.0)
    cause = why_not_draining(run, max_wait=timedelta(minutes=5), now=now) or ""
    assert "01234567 has been STARTED for 360 s" in cause and "may have died" in cause and "3600 s" in cause
