"""The control API over real HTTP on loopback, against a real Dagster instance (a tmp DAGSTER_HOME)
and a real sandbox, on both store backends: every endpoint's 200, 401, 403, 404 and 409, and a
triggered run that the instance launches, as its daemon would, and that syncs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import dagster as dg
import httpx
import pytest

from sync_project.definitions import defs
from sync_project.orchestration.control import RunLauncher
from sync_project.orchestration.schedules import poll_run
from sync_project.receiver.app import create_app
from sync_project.receiver.control_api import LazyLauncher
from sync_project.registry import get_sync
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.cli.test_connections_status import (  # noqa: F401 - fixtures
    acme,
    instance,
    run,
    sandbox,
    webhook_event,
)

CONTROL_ALL = "ctl_all_0c1f"
CONTROL_GLOBEX = "ctl_globex_77aa"
READER = "rec_reads_all_3e9d"
SYNC = get_sync("sandbox/contacts")
BASE = "/syncs/sandbox/contacts"
ENDPOINTS = [
    ("POST", f"{BASE}/trigger"),
    ("POST", f"{BASE}/pause"),
    ("POST", f"{BASE}/resume"),
    ("GET", f"{BASE}/status"),
]


@pytest.fixture
def api(
    instance: dg.DagsterInstance, acme: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[httpx.Client]:  # noqa: F811
    monkeypatch.setenv(
        "SYNC_RECORDS_API_TOKENS", f"{CONTROL_ALL}=control:*; {CONTROL_GLOBEX}=control:sandbox/globex; {READER}=*"
    )
    monkeypatch.delenv("SYNC_RECORDS_API_TOKEN", raising=False)
    with Store(database_url) as store:
        app = create_app(store, providers={}, control=LazyLauncher(RunLauncher.from_environment))
        with BackgroundServer(app) as server:
            with httpx.Client(base_url=server.url, headers=_bearer(CONTROL_ALL), timeout=30) as client:
                yield client


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def call(
    client: httpx.Client, method: str, path: str, connection: str = "acme", token: str | None = CONTROL_ALL, **body: str
) -> httpx.Response:
    headers = _bearer(token) if token else {"authorization": ""}
    if method == "GET":
        return client.get(path, params={"connection": connection}, headers=headers)
    return client.post(path, json={"connection": connection, **body}, headers=headers)


def test_every_endpoint_refuses_a_missing_or_wrong_token_a_token_out_of_scope_and_unknown_things(
    api: httpx.Client,
) -> None:
    for method, path in ENDPOINTS:
        for token in (None, "wrong-token"):
            refused = call(api, method, path, token=token)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.headers["www-authenticate"].startswith("Bearer")
        # A token that reads every record controls nothing; one for globex does not control acme.
        for token in (READER, CONTROL_GLOBEX):
            forbidden = call(api, method, path, token=token)
            assert (
                forbidden.status_code == 403
                and "may not control sandbox connection 'acme'" in forbidden.json()["error"]
            )
        missing = call(api, method, path, connection="initech")
        assert missing.status_code == 404 and "no connection 'initech'" in missing.json()["error"]
        # In scope but not registered: the globex token learns only what the acme one would.
        assert call(api, method, path, connection="globex", token=CONTROL_GLOBEX).status_code == 404
        nosync = call(api, method, path.replace("/contacts/", "/tickets/"))
        assert nosync.status_code == 404 and "no sync 'sandbox/tickets'" in nosync.json()["error"]
    bad_mode = call(api, "POST", f"{BASE}/trigger", mode="everything")
    assert bad_mode.status_code == 400 and "mode" in bad_mode.json()["error"]
    assert api.post(f"{BASE}/pause", json={"connection": "acme", "extra": 1}).status_code == 400
    assert api.post(f"{BASE}/pause", content=b"{not json").status_code == 400
    assert api.post(f"{BASE}/pause", json={}).status_code == 400
    assert api.get(f"{BASE}/status").status_code == 400
    assert api.get(f"{BASE}/status", params={"connection": "ac\x00me"}).status_code == 400
    assert api.get(f"{BASE}/status", params={"connection": "acme", "verbose": "1"}).status_code == 400
    # Without a token, nothing about the body or the parameters is told.
    assert api.post(f"{BASE}/trigger", content=b"{not json", headers={"authorization": ""}).status_code == 401


def test_trigger_queues_the_schedules_poll_and_409s_while_the_partition_is_taken(
    api: httpx.Client,
    instance: dg.DagsterInstance,
    database_url: str,  # noqa: F811
) -> None:
    queued = call(api, "POST", f"{BASE}/trigger", mode="full_refresh")
    assert queued.status_code == 200, queued.text
    answer = queued.json()
    assert (answer["status"], answer["mode"], answer["connection"]) == ("QUEUED", "full_refresh", "acme")
    dagster_run = instance.get_run_by_id(answer["run_id"])
    assert dagster_run is not None and dagster_run.status == dg.DagsterRunStatus.QUEUED
    run_config, schedule_tags = poll_run(SYNC, "acme", "full")
    # The scheduled poll's tags: the queue's one-poll-per-partition limit and its max runtime.
    assert schedule_tags.items() <= dagster_run.tags.items()
    assert dagster_run.tags["dagster/partition"] == "acme" and dagster_run.job_name == "sandbox__contacts_job"
    assert dagster_run.run_config["ops"]["sandbox__contacts"]["config"]["mode"] == "full"
    assert dagster_run.remote_job_origin is not None and dagster_run.remote_job_origin.location_name == "sync_project"

    again = call(api, "POST", f"{BASE}/trigger")
    assert again.status_code == 409 and f"run {answer['run_id']} (queued) already polls" in again.json()["error"]
    status = call(api, "GET", f"{BASE}/status")
    assert status.status_code == 200 and status.json()["queued_or_running_poll"] == answer["run_id"]

    instance.report_run_canceled(dagster_run)
    with Store(database_url) as store, store.leases.hold(SYNC.key, "acme", "poll", "run-from-a-backfill"):
        held = call(api, "POST", f"{BASE}/trigger")
        assert held.status_code == 409 and "run run-from-a-backfill holds the poll lease" in held.json()["error"]
        assert call(api, "GET", f"{BASE}/status").json()["poll_lease_holder"] == "run-from-a-backfill"

    assert call(api, "POST", f"{BASE}/pause").status_code == 200
    paused = call(api, "POST", f"{BASE}/trigger")
    assert paused.status_code == 409 and "is paused; resume it first" in paused.json()["error"]
    assert call(api, "POST", f"{BASE}/resume").status_code == 200
    assert call(api, "POST", f"{BASE}/trigger").status_code == 200


def test_pause_resume_and_status(api: httpx.Client, instance: dg.DagsterInstance, database_url: str) -> None:  # noqa: F811
    assert run(instance, "full").success
    with Store(database_url) as store:
        store.inbox.receive("sandbox", [webhook_event("evt-1", "con_new", "2030-01-01T00:00:00.000001Z")])

    status = call(api, "GET", f"{BASE}/status")
    assert status.status_code == 200, status.text
    body = status.json()
    assert (body["sync"], body["connection_id"], body["status"]) == ("sandbox/contacts", "acme", "active")
    assert body["last_success"]["mode"] == "full" and body["last_success"]["counts"]["added"] == 12
    assert body["last_success"]["row_count"] == 12
    assert body["checkpoint"] and "updated_after" in body["checkpoint"]
    assert (body["pending"], body["dead"], body["poll_lease_holder"], body["queued_or_running_poll"]) == (
        1,
        0,
        None,
        None,
    )

    paused = call(api, "POST", f"{BASE}/pause")
    assert paused.status_code == 200
    assert paused.json() == {
        "provider": "sandbox",
        "connection": "acme",
        "status": "paused",
        "syncs": ["sandbox/contacts", "sandbox/deals"],
    }
    with Store(database_url) as store:
        assert store.connections.get("sandbox", "acme").status == "paused"
    assert call(api, "GET", f"{BASE}/status").json()["next_poll"]["note"] == "paused"
    assert call(api, "POST", f"{BASE}/pause").status_code == 200  # pausing twice is still paused
    resumed = call(api, "POST", f"{BASE}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "active"
    with Store(database_url) as store:
        assert store.connections.get("sandbox", "acme").status == "active"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_triggered_run_is_launched_by_the_instance_and_syncs(
    api: httpx.Client,
    instance: dg.DagsterInstance,
    database_url: str,  # noqa: F811
) -> None:
    """What the daemon's run queue does with the queued run: launch it through the workspace's
    code location (a code server and a run process, as in production), here without a daemon."""
    from dagster._core.workspace.load import load_workspace_process_context_from_yaml_paths

    triggered = call(api, "POST", f"{BASE}/trigger", mode="full_refresh")
    assert triggered.status_code == 200, triggered.text
    run_id = triggered.json()["run_id"]
    launcher = RunLauncher.from_environment(defs)
    try:
        with load_workspace_process_context_from_yaml_paths(instance, [str(launcher.workspace_file)]) as workspace:
            instance.launch_run(run_id, workspace.create_request_context())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not instance.get_run_by_id(run_id).is_finished:  # type: ignore[union-attr]
                time.sleep(0.25)
    finally:
        launcher.close()
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS  # type: ignore[union-attr]
    with Store(database_url) as store:
        assert store.count(SYNC.key, "acme") == 12
    body = call(api, "GET", f"{BASE}/status").json()
    assert body["last_success"]["run_id"] == run_id and body["last_success"]["mode"] == "full"
