"""Asset checks on a real Dagster instance, over a real store (both backends): each run reports its
partition's checks, a failed run included; the scheduled job judges every connection between runs,
and the UI's *Checks* tab (its own GraphQL, in-process) shows what they found."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext, WorkspaceRequestContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster_graphql.test.utils import execute_dagster_graphql
from sqlalchemy import update

from sync_project.orchestration.checks import CHECKS_JOB, CheckSettings, DrainRun, why_not_draining
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.notifications import NotifierResource
from sync_project.orchestration.partitions import drain_tags, partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG
from sync_project.serving import BackgroundServer
from sync_project.store import RoutedEvent, Store
from sync_project.store.schema import connections, inbox
from sync_project_tests.orchestration.checks_location import SYNC
from sync_project_tests.orchestration.fake_api import PROVIDER, FakeApi
from sync_project_tests.support.dagster_ui import ASSET_CHECKS

ASSET = dg.AssetKey(["fakeapi", "items"])
CHECKS = {"inbox_backlog", "dead_letters", "connections_fresh", "inbox_healthy"}


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
        [SYNC],
        {"fakeapi": PROVIDER},
        store=StoreResource(database_url=store.url),
        notifier=NotifierResource(),
        check_settings=CheckSettings(backlog_max_wait=timedelta(minutes=5)),
    )


def sync_run(
    store: Store, instance: dg.DagsterInstance, connection_id: str = "acme", mode: str = "incremental"
) -> dict[str, dg.AssetCheckEvaluation]:
    result = (
        definitions(store)
        .resolve_job_def("fakeapi__items_job")
        .execute_in_process(
            instance=instance,
            partition_key=connection_id,
            run_config={"ops": {"fakeapi__items": {"config": {"mode": mode}}}},
        )
    )
    assert result.success
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def scheduled_checks(store: Store, instance: dg.DagsterInstance) -> dict[tuple[str, str], dg.AssetCheckEvaluation]:
    """The scheduled job's evaluations, by (check, connection)."""
    result = definitions(store).resolve_job_def(CHECKS_JOB).execute_in_process(instance=instance)
    assert result.success
    found = {(e.check_name, e.partition or ""): e for e in result.get_asset_check_evaluations()}
    assert len(found) == len(result.get_asset_check_evaluations())
    return found


def receive(store: Store, key: str, connection_id: str, *, received_ago: timedelta = timedelta(0)) -> int:
    store.inbox.receive(
        "fakeapi",
        [
            RoutedEvent(
                event_key=key,
                event_type="item.updated",
                account_id=connection_id,
                payload={"id": key, "name": key, "updated_at": "2026-02-01T00:00:00Z"},
                sync="fakeapi/items",
                connection_id=connection_id,
            )
        ],
    )
    [event] = store.inbox.events(event_key=key, connection_id=connection_id)
    if received_ago:
        with store.engine.begin() as conn:
            conn.execute(
                update(inbox)
                .where(inbox.c.id == event.id)
                .values(received_at=datetime.now(timezone.utc) - received_ago)
            )
    return event.id


def kill(store: Store, event_id: int, error: str) -> None:
    assert store.inbox.mark_failed(event_id, error, max_attempts=1) == "dead"


def values(evaluation: dg.AssetCheckEvaluation) -> dict[str, object]:
    return {key: value.value for key, value in evaluation.metadata.items()}


def test_every_run_reports_its_partitions_checks(connected, instance):
    checks = sync_run(connected, instance)
    assert set(checks) == CHECKS
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
    fresh = scheduled_checks(connected, instance)
    # Registered just now: within the window for a first sync.
    assert fresh[("connections_fresh", "acme")].passed and fresh[("connections_fresh", "globex")].passed

    now = datetime.now(timezone.utc)
    connected.state.record_run(
        "fakeapi/items", "acme", run_id="r1", mode="incremental", succeeded_at=now - interval * 2.5
    )
    connected.state.record_run("fakeapi/items", "globex", run_id="r2", mode="incremental", succeeded_at=now)
    checks = scheduled_checks(connected, instance)
    warn = checks[("connections_fresh", "acme")]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert values(warn)["late_warn"] == 1 and values(warn)["late_error"] == 0
    assert "acme" in (warn.description or "")
    assert checks[("connections_fresh", "globex")].passed

    connected.state.record_run(
        "fakeapi/items", "acme", run_id="r3", mode="incremental", succeeded_at=now - interval * 4
    )
    error = scheduled_checks(connected, instance)[("connections_fresh", "acme")]
    assert not error.passed and error.severity == dg.AssetCheckSeverity.ERROR

    connected.connections.set_status("fakeapi", "acme", "paused")  # not expected to sync
    paused = scheduled_checks(connected, instance)[("connections_fresh", "acme")]
    assert paused.passed and values(paused)["paused_connections"] == 1


def test_a_connection_that_never_synced_is_late_once_its_window_has_passed(connected, instance):
    with connected.engine.begin() as conn:
        conn.execute(
            update(connections)
            .where(connections.c.connection_id == "globex")
            .values(created_at=datetime.now(timezone.utc) - timedelta(hours=2))
        )
    sync_run(connected, instance, "acme")
    checks = scheduled_checks(connected, instance)
    check = checks[("connections_fresh", "globex")]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "globex" in (check.description or "") and "never synced" in (check.description or "")
    assert checks[("connections_fresh", "acme")].passed


def test_scheduled_inbox_check_sees_every_connection(connected, instance):
    checks = scheduled_checks(connected, instance)
    assert checks[("inbox_healthy", "acme")].passed and checks[("inbox_healthy", "globex")].passed
    receive(connected, "stuck", "globex", received_ago=timedelta(minutes=10))
    stuck = scheduled_checks(connected, instance)[("inbox_healthy", "globex")]
    assert not stuck.passed and stuck.severity == dg.AssetCheckSeverity.WARN
    kill(connected, receive(connected, "poison", "acme"), "TypeError: nope")
    checks = scheduled_checks(connected, instance)
    dead = checks[("inbox_healthy", "acme")]
    assert not dead.passed and dead.severity == dg.AssetCheckSeverity.ERROR
    assert values(dead)["dead"] == 1 and values(checks[("inbox_healthy", "globex")])["pending"] == 1
    assert "TypeError: nope" in (dead.description or "")


def test_the_scheduled_job_leaves_a_partition_with_a_run_in_progress_to_that_run(connected, instance):
    drain_run(connected, instance, "acme", started_ago=timedelta(seconds=10))
    checks = scheduled_checks(connected, instance)
    assert {partition for _, partition in checks} == {"globex"}


def test_the_asset_carries_a_freshness_policy_of_its_poll_interval():
    defs = build_definitions([SYNC], {"fakeapi": PROVIDER}, notifier=NotifierResource())
    policy = defs.resolve_assets_def(ASSET).specs_by_key[ASSET].freshness_policy
    assert policy.fail_window.to_timedelta() == SYNC.poll_interval * 3
    assert policy.warn_window.to_timedelta() == SYNC.poll_interval * 2
    schedule = defs.resolve_schedule_def("sync_checks_schedule")
    assert schedule.job_name == CHECKS_JOB and schedule.default_status == dg.DefaultScheduleStatus.RUNNING


@pytest.mark.parametrize(
    "settings",
    [
        {"backlog_max_wait": timedelta(0)},
        {"freshness_warn_factor": 3.0, "freshness_fail_factor": 2.0},
        {"freshness_warn_factor": 0.5},
    ],
)
def test_nonsense_thresholds_are_refused(settings):
    with pytest.raises(ValueError):
        CheckSettings(**settings)


def drain_run(
    store: Store, instance: dg.DagsterInstance, connection_id: str, *, started_ago: timedelta | None
) -> dg.DagsterRun:
    """A webhook run of the partition as the inbox sensor requests it; started ``started_ago``."""
    job = definitions(store).resolve_job_def("fakeapi__items_job")
    run = instance.create_run_for_job(
        job,
        status=dg.DagsterRunStatus.NOT_STARTED,
        tags={
            **drain_tags("fakeapi/items", connection_id),
            "sync/mode": "webhook",
            MAX_RUNTIME_TAG: "135",
            "dagster/partition": connection_id,
        },
    )
    if started_ago is not None:
        started = dg.DagsterEvent(dg.DagsterEventType.RUN_START.value, job_name=run.job_name)
        instance.report_dagster_event(
            started, run.run_id, timestamp=(datetime.now(timezone.utc) - started_ago).timestamp()
        )
    return instance.get_run_by_id(run.run_id)


def test_the_scheduled_check_names_a_connection_that_is_not_draining_and_why(connected, instance):
    receive(connected, "stuck", "globex", received_ago=timedelta(minutes=10))

    def description() -> str:
        check = scheduled_checks(connected, instance)[("inbox_healthy", "globex")]
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
    # (Left to that run by the scheduled job, so read through a run's own evaluation.)
    drain_run(connected, instance, "globex", started_ago=timedelta(minutes=1))
    check = sync_run(connected, instance, "globex", mode="incremental")["inbox_healthy"]
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


# -- what the UI's Checks tab shows ---------------------------------------------------------------


@pytest.fixture
def ui(instance: dg.DagsterInstance) -> Iterator[WorkspaceRequestContext]:
    """The webserver's GraphQL over this instance, with the code location loaded in-process."""
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="sync_project_tests.orchestration.checks_location", attribute="defs"),
        location_name="checks_location",
    )
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        # Entered, as the webserver enters it per request: dynamic partitions load from the instance.
        with workspace.create_request_context() as request:
            yield request


def checks_tab(ui: WorkspaceRequestContext) -> dict[str, dict]:
    result = execute_dagster_graphql(ui, ASSET_CHECKS, {"assetKey": {"path": ASSET.path}})
    assert not result.errors, result.errors
    return {c["name"]: c for c in result.data["assetNodeOrError"]["assetChecksOrError"]["checks"]}


def test_the_checks_tab_shows_the_scheduled_result_of_a_partition_after_others_materialize(connected, instance, ui):
    sync_run(connected, instance, "acme")
    receive(connected, "stuck", "globex", received_ago=timedelta(minutes=10))
    scheduled_checks(connected, instance)
    # Another connection materializes after the scheduled job, as webhook runs do all the time.
    sync_run(connected, instance, "acme", mode="incremental")
    tab = checks_tab(ui)
    assert set(tab) == CHECKS
    healthy = tab["inbox_healthy"]
    assert healthy["executionForLatestMaterialization"] is not None  # not "Not evaluated"
    statuses = healthy["partitionStatuses"]
    assert statuses["failedPartitions"] == ["globex"] and statuses["succeededPartitions"] == ["acme"]
    fresh = tab["connections_fresh"]["partitionStatuses"]
    assert sorted(fresh["succeededPartitions"]) == ["acme", "globex"]


def test_a_run_that_fails_before_its_checks_does_not_report_them_failed(connected, instance, ui):
    connected.connections.remove("fakeapi", "globex")
    connected.connections.add("fakeapi", "globex", account_id="globex", config={"base_url": "http://127.0.0.1:9"})
    result = (
        definitions(connected)
        .resolve_job_def("fakeapi__items_job")
        .execute_in_process(
            instance=instance,
            partition_key="globex",
            raise_on_error=False,
            run_config={"ops": {"fakeapi__items": {"config": {"mode": "incremental"}}}},
        )
    )
    assert not result.success  # the provider did not answer
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == CHECKS and evaluations["dead_letters"].passed and evaluations["inbox_backlog"].passed
    tab = checks_tab(ui)
    for name in ("dead_letters", "inbox_backlog", "inbox_healthy"):
        statuses = tab[name]["partitionStatuses"]
        assert statuses["succeededPartitions"] == ["globex"], (name, statuses)
        assert statuses["failedPartitions"] == statuses["executionFailedPartitions"] == []
        assert tab[name]["executionForLatestMaterialization"]["status"] == "SUCCEEDED"
