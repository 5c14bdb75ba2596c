"""Credentials a running deployment picks up: a connection added after the definitions loaded (the
services are up) syncs at its first run, for each kind of reference (an environment variable, a
file, a key of the secrets directory, the store itself sealed with Fernet), against an API that
wants the bearer token. The secret appears in no Dagster log, no `connections list` and no
`connections status` output. Store on both backends, a real Dagster instance in-process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from sync_project.cli import connection_status as view
from sync_project.cli import main
from sync_project.core.credentials import KEY_ENV, SECRETS_DIR_ENV, CredentialsError, generate_key
from sync_project.orchestration.assets import SyncRunConfig, job_name, op_name
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi

TOKEN = "tok_live_5f2c1e9a7b"  # what the API wants; must never be shown


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi(token=TOKEN)
    for n in range(12):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    with BackgroundServer(fake.app()) as server:
        yield fake, server.url


def run_logs(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(f"{record.message} {record.dagster_event}" for record in instance.all_logs(run_id))


def test_connections_added_while_running_sync_with_every_kind_of_reference(
    store: Store, api: tuple[FakeApi, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = api
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    with dg.instance_for_test() as instance:
        # The deployment is up: definitions loaded, instance running, no connection yet.
        defs = build_definitions([ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=store.url))
        job = defs.resolve_job_def(job_name(ITEMS))
        # Then the deployment's environment as its processes have it (key and secrets dir are
        # deployment settings, set once); the connections' secrets come after, one by one.
        monkeypatch.setenv(KEY_ENV, generate_key())
        monkeypatch.setenv(SECRETS_DIR_ENV, str(secrets_dir))

        token_file = tmp_path / "acme.token"
        token_file.write_text(TOKEN + "\n")
        (secrets_dir / "globex-token").write_text(TOKEN)
        monkeypatch.setenv("INITECH_TOKEN", TOKEN)
        added = {
            "by-file": {"credentials_file": str(token_file)},
            "by-secret": {"credentials_secret": "globex-token"},
            "by-store": {"credentials_value": TOKEN},
            "by-env": {"credentials_env": "INITECH_TOKEN"},
        }
        for connection_id, reference in added.items():
            store.connections.add("fakeapi", connection_id, config={"base_url": url}, **reference)
            instance.add_dynamic_partitions(partitions_name("fakeapi"), [connection_id])
            result = job.execute_in_process(
                instance=instance,
                partition_key=connection_id,
                raise_on_error=False,
                run_config=dg.RunConfig(ops={op_name(ITEMS): SyncRunConfig(mode="incremental")}),
            )
            assert result.success, connection_id
            assert store.count(ITEMS.key, connection_id) == 12, connection_id
            assert TOKEN not in run_logs(instance, result.run_id)

        # The sealed secret is not the secret, and the row's other columns name no secret.
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT * FROM connections").all()
        assert TOKEN not in repr(rows)

        # Nothing shows it: list, list --json, status of one connection.
        env = {"SYNC_DATABASE_URL": store.url, "DAGSTER_HOME": instance.root_directory}
        runner = CliRunner()
        listed = runner.invoke(main, ["connections", "list"], env=env)
        as_json = runner.invoke(main, ["connections", "list", "--json"], env=env)
        assert listed.exit_code == 0 and as_json.exit_code == 0, listed.output + as_json.output
        for output in (listed.output, as_json.output):
            assert TOKEN not in output and "gAAAA" not in output  # neither the secret nor its Fernet token
        assert f"credentials=file:{token_file}" in listed.output and "credentials=secret:globex-token" in listed.output
        assert "credentials=stored (encrypted)" in listed.output and "credentials=$INITECH_TOKEN" in listed.output
        assert {row["credentials"] for row in json.loads(as_json.output)} >= {"stored (encrypted)", "$INITECH_TOKEN"}
        assert all("credentials_sealed" not in row for row in json.loads(as_json.output))
        assert repr(store.connections.get("fakeapi", "by-store")).count(TOKEN) == 0
        # `connections status` (its full view and its --json rows) of every one of them.
        connections = store.connections.list("fakeapi")
        statuses = view.partition_statuses(store, instance, defs, [ITEMS], connections)
        shown = [
            line
            for c in connections
            for line in view.detail([s for s in statuses if s.connection_id == c.connection_id], c, view.utcnow())
        ]
        shown += [s.model_dump_json() for s in statuses]
        assert TOKEN not in "\n".join(shown) and "credentials stored (encrypted)" in "\n".join(shown)

        # Rotation in place: the file changes, the next run reads the new one (no restart).
        fake.token = "tok_rotated"
        token_file.write_text("tok_rotated")
        rotated = job.execute_in_process(
            instance=instance,
            partition_key="by-file",
            raise_on_error=False,
            run_config=dg.RunConfig(ops={op_name(ITEMS): SyncRunConfig(mode="full")}),
        )
        assert rotated.success

        # A reference that does not resolve fails the run naming where it looked, not a secret.
        monkeypatch.setenv(KEY_ENV, generate_key())  # another deployment's key
        failed = job.execute_in_process(instance=instance, partition_key="by-store", raise_on_error=False)
        assert not failed.success
        assert f"do not open with {KEY_ENV}" in run_logs(instance, failed.run_id)


def test_bad_references_are_refused_clearly(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        store.connections.add("fakeapi", "a", credentials_file="relative/token")
    with pytest.raises(ValueError, match="one file of the secrets directory"):
        store.connections.add("fakeapi", "b", credentials_secret="../etc/passwd")
    with pytest.raises(ValueError, match="one credentials reference"):
        store.connections.add("fakeapi", "c", credentials_env="X", credentials_secret="y")
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(CredentialsError, match=f"{KEY_ENV} is not set"):
        store.connections.add("fakeapi", "d", credentials_value="secret")
    assert store.connections.list("fakeapi") == []
    store.connections.add("fakeapi", "e", credentials_file="/nonexistent/token")
    with pytest.raises(CredentialsError, match="/nonexistent/token does not exist"):
        store.connections.get("fakeapi", "e").credentials()
