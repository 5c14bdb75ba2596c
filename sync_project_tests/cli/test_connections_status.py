"""``sync-project connections status`` and ``inbox stats --by-connection`` over real runs.

Runs of the project's own jobs execute in this process against a real Dagster instance (a tmp
DAGSTER_HOME) and a real sandbox over HTTP, on both store backends; the command then reads what
those runs left behind: materializations with their counts, a failed run's error, the inbox.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from click.testing import CliRunner

from sync_project import settings
from sync_project.cli import main
from sync_project.definitions import defs
from sync_project.orchestration.partitions import partitions_name
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer
from sync_project.sandbox.service import AccountSpec, SandboxConfig
from sync_project.store import RoutedEvent, Store

TOKEN = "token-of-acct-1"
TOKEN_ENV = "STATUS_TEST_TOKEN"


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    config = SandboxConfig(
        accounts=[AccountSpec(account_id="acct-1", token=TOKEN, contacts=12, deals=3)],
        rate_limit=RateLimitSettings(enabled=False),
    )
    with SandboxServer(config) as server:
        yield server


@pytest.fixture
def instance(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("SYNC_DATABASE_URL", database_url)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with dg.DagsterInstance.from_config(str(home)) as opened:
        yield opened


@pytest.fixture
def acme(instance: dg.DagsterInstance, sandbox: SandboxServer, database_url: str) -> str:
    with Store(database_url) as store:
        store.connections.add(
            "sandbox", "acme", account_id="acct-1", credentials_env=TOKEN_ENV, config={"base_url": sandbox.base_url}
        )
    instance.add_dynamic_partitions(partitions_name("sandbox"), ["acme"])
    return "acme"


def run(instance: dg.DagsterInstance, mode: str) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("sandbox__contacts_job")
    return job.execute_in_process(
        instance=instance,
        partition_key="acme",
        raise_on_error=False,
        run_config={"ops": {"sandbox__contacts": {"config": {"mode": mode}}}},
    )


def webhook_event(key: str, object_id: str, updated_at: str) -> RoutedEvent:
    payload = {
        "id": key,
        "type": "contact.updated",
        "account_id": "acct-1",
        "occurred_at": updated_at,
        "data": {
            "id": object_id,
            "email": f"{object_id}@example.com",
            "first_name": "A",
            "last_name": "B",
            "company": None,
            "updated_at": updated_at,
            "created_at": "2020-01-01T00:00:00.000001Z",
        },
    }
    return RoutedEvent(
        event_key=key,
        event_type="contact.updated",
        account_id="acct-1",
        payload=payload,
        sync="sandbox/contacts",
        connection_id="acme",
    )


def status_json(*args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(main, ["connections", "status", *args, "--json"])
    assert result.exit_code == 0, result.output
    return list(json.loads(result.output))


def contacts_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    [row] = [r for r in rows if r["sync"] == "sandbox/contacts"]
    return row


def test_status_reports_runs_errors_backlog_dead_letters_and_the_next_poll(
    instance: dg.DagsterInstance, acme: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    [row] = [r for r in status_json() if r["sync"] == "sandbox/contacts"]
    assert row["last_success"] is None and row["last_failure"] is None and row["pending"] == 0

    full = run(instance, "full")
    assert full.success
    # A webhook run: two events applied (one new contact, one update of a polled one).
    with Store(database_url) as store:
        polled = store.dataframe("sandbox/contacts", "acme")["_id"].tolist()
        store.inbox.receive(
            "sandbox",
            [
                webhook_event("evt-new", "con_new", "2030-01-01T00:00:00.000001Z"),
                webhook_event("evt-upd", polled[0], "2030-01-01T00:00:00.000002Z"),
            ],
        )
    assert run(instance, "webhook").success
    # Then: two events wait, one is dead, and a run fails on a revoked token.
    with Store(database_url) as store:
        store.inbox.receive(
            "sandbox",
            [webhook_event(f"evt-wait-{n}", f"con_w{n}", "2030-01-01T00:00:01.000001Z") for n in range(2)]
            + [webhook_event("evt-dead", "con_d", "2030-01-01T00:00:02.000001Z")],
        )
        dead_id = next(e.id for e in store.inbox.events(event_key="evt-dead"))
        store.inbox.mark_failed(dead_id, "KeyError: 'email'", max_attempts=1)
    monkeypatch.setenv(TOKEN_ENV, "revoked-token")
    assert not run(instance, "incremental").success

    row = contacts_row(status_json())
    assert row["last_success"]["mode"] == "webhook"
    assert row["last_success"]["counts"] == {
        "added": 1,
        "updated": 1,
        "deleted": 0,
        "unchanged": 0,
        "skipped_stale": 0,
        "skipped_missing": 0,
    }
    assert row["last_success"]["work"]["events_drained"] == 2
    assert row["last_poll"]["mode"] == "full" and row["last_poll"]["run_id"] == full.run_id
    assert row["last_poll"]["counts"]["added"] == 12 and row["last_poll"]["work"]["records_fetched"] == 12
    failure = row["last_failure"]
    assert "HTTP 401" in failure["error"] and failure["superseded"] is False
    assert (row["pending"], row["dead"]) == (2, 1)
    assert row["newest_dead_error"] == "KeyError: 'email'"
    # The schedule polls every 5 minutes; no daemon runs in this test, and the command says so.
    next_at = datetime.fromisoformat(row["next_poll"]["at"])
    now = datetime.now(timezone.utc)
    assert now < next_at <= now + timedelta(minutes=5) and next_at.minute % 5 == 0 and next_at.second == 0
    assert row["next_poll"]["note"] == "no daemon"

    table = CliRunner().invoke(main, ["connections", "status"])
    assert table.exit_code == 0, table.output
    header, *lines = table.output.splitlines()
    assert header.split()[:4] == ["SYNC", "CONNECTION", "STATUS", "LAST"]
    [contacts_line] = [line for line in lines if line.startswith("sandbox/contacts")]
    assert "(webhook)" in contacts_line and "+1 ~1 -0 =0" in contacts_line
    assert "2, oldest" in contacts_line and "HTTP 401" in contacts_line
    assert "no Dagster daemon has reported" in table.output

    detail = CliRunner().invoke(main, ["connections", "status", "sandbox", "acme"])
    assert detail.exit_code == 0, detail.output
    assert f"full run {full.run_id}: added 12" in detail.output
    assert "HTTP 401" in detail.output and "KeyError: 'email'" in detail.output
    assert "inbox replay --status dead" in detail.output

    # The token is fixed: the next poll succeeds, and the failure is shown as superseded.
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert run(instance, "incremental").success
    row = contacts_row(status_json("sandbox"))
    assert row["last_success"]["mode"] == "incremental" and row["last_poll"]["mode"] == "incremental"
    assert row["last_failure"]["superseded"] is True


def test_a_failure_the_store_never_saw_is_reported_from_the_run(
    instance: dg.DagsterInstance, acme: str, database_url: str
) -> None:
    """A run for a paused connection fails before it touches the store; Dagster keeps its error."""
    assert CliRunner().invoke(main, ["connections", "pause", "sandbox", "acme"]).exit_code == 0
    assert not run(instance, "incremental").success
    row = contacts_row(status_json("sandbox", "acme"))
    assert "is paused" in row["last_failure"]["error"]
    assert row["next_poll"] == {"at": None, "note": "paused", "schedule": "poll_sandbox__contacts"}


def test_status_refuses_an_unknown_provider_or_connection(instance: dg.DagsterInstance, acme: str) -> None:
    unknown = CliRunner().invoke(main, ["connections", "status", "nope"])
    assert unknown.exit_code == 1 and "unknown provider 'nope'" in unknown.output
    missing = CliRunner().invoke(main, ["connections", "status", "sandbox", "globex"])
    assert missing.exit_code == 1 and "no connection 'globex'" in missing.output


def test_inbox_stats_by_connection(instance: dg.DagsterInstance, acme: str, database_url: str) -> None:
    with Store(database_url) as store:
        store.connections.add("sandbox", "globex", account_id="acct-2")
        store.inbox.receive(
            "sandbox",
            [
                webhook_event("a1", "con_1", "2030-01-01T00:00:00.000001Z"),
                webhook_event("a2", "con_2", "2030-01-01T00:00:00.000001Z"),
            ],
        )
        globex = replace(webhook_event("g1", "con_1", "2030-01-01T00:00:00.000001Z"), connection_id="globex")
        unroutable = replace(
            webhook_event("u1", "con_1", "2030-01-01T00:00:00.000001Z"),
            connection_id="",
            status="unroutable",
            account_id="acct-9",
        )
        store.inbox.receive("sandbox", [globex, unroutable])
        store.inbox.mark_failed(next(e.id for e in store.inbox.events(event_key="g1")), "boom", max_attempts=1)

    result = CliRunner().invoke(main, ["inbox", "stats", "--by-connection"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    columns = header.split()
    assert columns[:3] == ["PROVIDER", "CONNECTION", "pending"]
    table = {
        tuple(row.split()[:2]): dict(zip(columns[2:], row.split()[2:], strict=False)) for row in rows if row.strip()
    }
    assert table[("sandbox", "acme")]["pending"] == "2" and table[("sandbox", "acme")]["dead"] == "0"
    assert table[("sandbox", "globex")]["dead"] == "1" and table[("sandbox", "globex")]["pending"] == "0"
    assert table[("sandbox", "(none)")]["unroutable"] == "1"

    as_json = CliRunner().invoke(main, ["inbox", "stats", "--by-connection", "--json"])
    figures = {(f["provider"], f["connection_id"]): f for f in json.loads(as_json.output)}
    assert figures[("sandbox", "acme")]["counts"]["pending"] == 2
    assert figures[("sandbox", "acme")]["oldest_pending_received_at"] is not None
    assert figures[("sandbox", "")]["counts"]["unroutable"] == 1


def test_inbox_help_explains_every_status() -> None:
    from sync_project.store.inbox import INBOX_STATUSES

    result = CliRunner().invoke(main, ["inbox", "stats", "--help"])
    text = " ".join(result.output.split())
    for status in INBOX_STATUSES:
        assert f"{status}:" in text, status
    assert "routed: an unroutable event that a replay" in text
