"""A sync of several models on a real Dagster instance, on both store backends: ``github/issues``
and ``github/issue_comments`` from one fetch of GitHub (served from fixtures shaped like its
documented responses), each its own asset with its own counts, records and change feed; webhooks
that change one model or both; delete detection and a reset per model."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import httpx
import pytest

from sync_project.orchestration.assets import SyncRunConfig, build_sync_asset, op_name
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.providers.github import GitHubProvider
from sync_project.receiver.app import create_app
from sync_project.serving import BackgroundServer
from sync_project.store import RoutedEvent, Store
from sync_project.syncs import github_issues
from sync_project_tests.providers._support import fixture
from sync_project_tests.providers.test_github import FakeGitHub

SYNC = github_issues.issues
ISSUES, COMMENTS = dg.AssetKey(["github", "issues"]), dg.AssetKey(["github", "issue_comments"])
CONNECTION = "hello-world"


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("github"), [CONNECTION])
        yield test_instance


@pytest.fixture
def github() -> FakeGitHub:
    return FakeGitHub(fixture("github/issues.json"), comments=fixture("github/issue_comments.json"))


@pytest.fixture
def connected(store: Store) -> Store:
    store.connections.add("github", CONNECTION, account_id="octocat/Hello-World")
    return store


def materialize(instance: dg.DagsterInstance, store: Store, github: FakeGitHub, mode: str, **config: object):
    provider = GitHubProvider(transport=httpx.MockTransport(github), sleep=lambda _s: None)
    result = dg.materialize(
        [build_sync_asset(SYNC, provider)],
        partition_key=CONNECTION,
        instance=instance,
        resources={"sync_store": StoreResource(database_url=store.url)},
        run_config=dg.RunConfig(ops={op_name(SYNC): SyncRunConfig(mode=mode, **config)}),  # type: ignore[arg-type]
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    events = result.get_asset_materialization_events()
    materialized[:] = [event.asset_key for event in events]
    # The run's own result for each asset comes last (a webhook run records batches before it).
    return {
        event.asset_key: {key: value.value for key, value in event.materialization.metadata.items()} for event in events
    }


#: The asset keys of the last run's materializations, in order.
materialized: list[dg.AssetKey] = []


def comment_event(name: str, key: str) -> RoutedEvent:
    payload = fixture(f"github/{name}")
    return RoutedEvent(
        event_key=key,
        event_type="issue_comment",
        account_id="octocat/Hello-World",
        payload=payload,
        sync=SYNC.key,
        connection_id=CONNECTION,
    )


def test_one_run_materializes_every_model_with_its_own_counts(
    instance, connected: Store, github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = materialize(instance, connected, github, "full")
    assert set(full) == {ISSUES, COMMENTS}
    assert (full[ISSUES]["added"], full[ISSUES]["dagster/row_count"]) == (5, 5)  # the pull request left out
    assert (full[COMMENTS]["added"], full[COMMENTS]["dagster/row_count"]) == (5, 5)
    assert full[COMMENTS]["mode"] == "full"
    # One fetch: the issues, then the repository's comments, each list read once.
    assert github.requests and github.comment_requests
    # Each model has its records and change feed; the sync has one checkpoint for both.
    comments = connected.changes("github/issue_comments", CONNECTION, limit=100).records
    assert sorted(c.id for c in comments) == ["101", "102", "103", "104", "105"]
    assert {c.data["issue_number"] for c in comments} == {1347, 1350, 1351, 1352}
    assert connected.count("github/issues", CONNECTION) == 5
    checkpoint = connected.state.get(SYNC.key, CONNECTION).checkpoint  # type: ignore[union-attr]
    assert set(checkpoint) == {"since", "comments_since"}  # type: ignore[arg-type]
    assert connected.state.get("github/issue_comments", CONNECTION) is None

    # An incremental poll starts both lists at the checkpoint and finds nothing new.
    github.comments[0] = {**github.comments[0], "body": "Me too (edited)", "updated_at": "2024-05-01T00:00:00Z"}
    incremental = materialize(instance, connected, github, "incremental")
    assert github.comment_requests[-1].url.params["since"] == checkpoint["comments_since"]  # type: ignore[index]
    # The edited comment, and the newest one again (the checkpoint stays a second behind it).
    assert (incremental[COMMENTS]["updated"], incremental[COMMENTS]["unchanged"]) == (1, 1)
    assert incremental[ISSUES]["updated"] == 0

    # A comment gone from GitHub is tombstoned by the next full refresh, in its model only.
    del github.comments[2]
    refreshed = materialize(instance, connected, github, "full")
    assert (refreshed[COMMENTS]["deleted"], refreshed[COMMENTS]["dagster/row_count"]) == (1, 4)
    assert (refreshed[ISSUES]["deleted"], refreshed[ISSUES]["dagster/row_count"]) == (0, 5)
    assert connected.get("github/issue_comments", CONNECTION, "103").last_action == "deleted"  # type: ignore[union-attr]

    # Each model's change feed over the records API, as the customer's app reads it.
    monkeypatch.setenv("SYNC_RECORDS_API_TOKEN", "rec_multi_model_1f")
    with BackgroundServer(create_app(connected, providers={}, syncs=[SYNC])) as server:
        for path, expected in (("github/issue_comments", 5), ("github/issues", 5)):
            answer = httpx.get(
                f"{server.url}/records/{path}",
                params={"connection": CONNECTION},
                headers={"authorization": "Bearer rec_multi_model_1f"},
                timeout=30,
            )
            assert answer.status_code == 200 and len(answer.json()["records"]) == expected


def test_webhooks_change_one_model_or_both_and_a_reset_covers_every_model(
    instance, connected: Store, github: FakeGitHub
) -> None:
    materialize(instance, connected, github, "full")
    connected.inbox.receive("github", [comment_event("webhook_issue_comment_created.json", "delivery-1")])
    drained = materialize(instance, connected, github, "webhook")
    # The comment, and the issue it carries (a new one here): one event, two models.
    assert (drained[COMMENTS]["added"], drained[COMMENTS]["dagster/row_count"]) == (1, 6)
    assert (drained[ISSUES]["added"], drained[ISSUES]["events_drained"]) == (1, 1)
    # While it drains, each batch is recorded for every model's asset, then the run's totals.
    assert materialized == [ISSUES, COMMENTS, ISSUES, COMMENTS]
    stored = connected.get("github/issue_comments", CONNECTION, "2001")
    assert stored is not None and stored.data["issue_number"] == 1

    connected.inbox.receive("github", [comment_event("webhook_issue_comment_deleted.json", "delivery-2")])
    deleted = materialize(instance, connected, github, "webhook")
    assert (deleted[COMMENTS]["deleted"], deleted[COMMENTS]["dagster/row_count"]) == (1, 5)
    assert deleted[ISSUES]["updated"] == 1  # its comment count went down again
    assert json.loads(json.dumps(connected.get("github/issues", CONNECTION, "444500041").data))["comments"] == 0  # type: ignore[union-attr]

    reset = materialize(instance, connected, github, "reset", empty_records="tombstone", confirm=CONNECTION)
    assert (reset[ISSUES]["tombstoned"], reset[ISSUES]["dagster/row_count"]) == (6, 0)
    assert (reset[COMMENTS]["deleted"], reset[COMMENTS]["dagster/row_count"]) == (5, 0)
    assert connected.state.get(SYNC.key, CONNECTION).checkpoint is None  # type: ignore[union-attr]
    assert [r.records for r in connected.resets.list("github/issue_comments", CONNECTION)] == ["tombstoned"]
