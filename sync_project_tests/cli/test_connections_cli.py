"""``sync-project connections`` run as a user runs it: a subprocess against a real Dagster home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from sync_project import definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.store import RoutedEvent, Store


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync_project.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return {**os.environ, "DAGSTER_HOME": str(home), "SYNC_DATABASE_URL": database_url, "SECRET_TOKEN": "s3cr3t-value"}


def test_add_list_pause_resume_remove(env: dict[str, str], database_url: str) -> None:
    added = cli("connections", "add", "fakeprovider", "acme", env=env)
    assert added.returncode != 0 and "unknown provider 'fakeprovider'" in added.stderr

    provider = "sandbox"
    added = cli(
        "connections",
        "add",
        provider,
        "acme",
        "--account-id",
        "acct-1",
        "--credentials-env",
        "SECRET_TOKEN",
        "--config",
        "base_url=http://127.0.0.1:1",
        env=env,
    )
    assert added.returncode == 0, added.stderr
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"])) as instance:
        assert instance.get_dynamic_partitions(partitions_name(provider)) == ["acme"]

    listed = cli("connections", "list", "--json", env=env)
    [row] = json.loads(listed.stdout)
    assert (row["connection_id"], row["account_id"], row["credentials_env"], row["status"]) == (
        "acme",
        "acct-1",
        "SECRET_TOKEN",
        "active",
    )
    assert row["config"] == {"base_url": "http://127.0.0.1:1"}
    human = cli("connections", "list", env=env).stdout
    assert "s3cr3t-value" not in human and "s3cr3t-value" not in listed.stdout

    duplicate = cli("connections", "add", provider, "acme", env=env)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    bad_key = cli("connections", "add", provider, "a,b", env=env)
    assert bad_key.returncode != 0 and "may not contain ','" in bad_key.stderr

    assert cli("connections", "pause", provider, "acme", env=env).returncode == 0
    with Store(database_url) as store:
        assert store.connections.get(provider, "acme").status == "paused"
    assert cli("connections", "resume", provider, "acme", env=env).returncode == 0
    with Store(database_url) as store:
        assert store.connections.get(provider, "acme").status == "active"

    with Store(database_url) as store:
        store.inbox.receive(
            provider,
            [
                RoutedEvent(
                    event_key="e1",
                    event_type="contact.updated",
                    account_id="acct-1",
                    payload={"id": "1"},
                    sync="sandbox/contacts",
                    connection_id="acme",
                )
            ],
        )
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"])) as instance:
        job = definitions.defs.resolve_job_def("sandbox__contacts_job")
        queued = instance.create_run_for_job(
            job, status=dg.DagsterRunStatus.NOT_STARTED, tags={"dagster/partition": "acme"}
        )
    removed = cli("connections", "remove", provider, "acme", env=env)
    assert removed.returncode == 0, removed.stderr
    assert "1 pending webhook event(s) orphaned" in removed.stdout and "1 queued run(s)" in removed.stdout
    missing = cli("connections", "remove", provider, "acme", env=env)
    assert missing.returncode != 0 and "no connection 'acme'" in missing.stderr
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"])) as instance:
        assert instance.get_dynamic_partitions(partitions_name(provider)) == []
        assert instance.get_run_by_id(queued.run_id).status == dg.DagsterRunStatus.CANCELED
    with Store(database_url) as store:
        assert store.inbox.count(status="orphaned") == 1
    back = cli("connections", "add", provider, "acme", "--account-id", "acct-1", env=env)
    assert back.returncode == 0 and "1 webhook event(s) of it are pending" in back.stdout


def test_add_refuses_a_bad_id_without_noting_the_variable_first(env: dict[str, str]) -> None:
    """The note about an unset variable used to come first, then the refusal: only the refusal is true."""
    refused = cli("connections", "add", "sandbox", "a,b", "--credentials-env", "NOT_SET_ANYWHERE", env=env)
    assert refused.returncode != 0 and "may not contain ','" in refused.stderr
    assert "NOT_SET_ANYWHERE" not in refused.stderr
    accepted = cli("connections", "add", "sandbox", "ok", "--credentials-env", "NOT_SET_ANYWHERE", env=env)
    assert accepted.returncode == 0, accepted.stderr
    assert "note: NOT_SET_ANYWHERE is not set in this shell" in accepted.stderr
    duplicate = cli("connections", "add", "sandbox", "ok", "--credentials-env", "NOT_SET_ANYWHERE", env=env)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr and "note:" not in duplicate.stderr


def test_every_connections_command_has_help_text() -> None:
    from click.testing import CliRunner

    from sync_project.cli import main

    for name in ("add", "list", "pause", "resume", "remove", "status"):
        shown = CliRunner().invoke(main, ["connections", name, "--help"])
        assert shown.exit_code == 0
        description = shown.output.split("\n\n")[1].strip()  # the paragraph after "Usage: ..."
        assert description and not description.startswith("Options:"), (name, shown.output)
    resume = " ".join(CliRunner().invoke(main, ["connections", "resume", "--help"]).output.split())
    assert "the inbox sensor drains the webhooks that queued while it was paused" in resume
