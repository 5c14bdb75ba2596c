"""``sync-project syncs reset`` and a run in reset mode, on both backends, against a real sandbox
over HTTP and a real Dagster instance: with and without emptying the records, confirmation, and a
refusal while a run holds the partition's poll lease."""

from __future__ import annotations

import dagster as dg
from click.testing import CliRunner

from sync_project.cli import main
from sync_project.definitions import defs
from sync_project.store import Store
from sync_project_tests.cli.test_connections_status import acme, instance, sandbox  # noqa: F401 - fixtures

SYNC = "sandbox/contacts"


def run(instance: dg.DagsterInstance, **config: object) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("sandbox__contacts_job")
    return job.execute_in_process(
        instance=instance,
        partition_key="acme",
        raise_on_error=False,
        run_config={"ops": {"sandbox__contacts": {"config": config}}},
    )


def reset(*args: str, input: str | None = None):
    return CliRunner().invoke(main, ["syncs", "reset", SYNC, "acme", *args], input=input)


def materialization(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    [event] = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_reset_from_the_command_line_with_and_without_emptying(instance, acme, database_url) -> None:  # noqa: F811
    assert run(instance, mode="full").success
    with Store(database_url) as store:
        state = store.state.get(SYNC, "acme")
        assert state is not None and state.checkpoint
        cursor = store.changes(SYNC, "acme", limit=1000).next_cursor

    kept = reset()
    assert kept.exit_code == 0, kept.output
    assert "reset sandbox/contacts for connection 'acme': checkpoint cleared; records kept" in kept.output
    with Store(database_url) as store:
        assert store.state.get(SYNC, "acme").checkpoint is None  # type: ignore[union-attr]
        assert store.count(SYNC, "acme") == 12

    refused = reset("--empty-records", input="n\n")
    assert refused.exit_code == 1 and "tombstone all 12 live records of sandbox/contacts for 'acme'" in refused.output
    with Store(database_url) as store:
        assert store.count(SYNC, "acme") == 12

    emptied = reset("--empty-records", input="y\n")
    assert emptied.exit_code == 0, emptied.output
    assert "no checkpoint to clear; 12 records tombstoned" in emptied.output
    with Store(database_url) as store:
        assert store.count(SYNC, "acme") == 0
        page = store.changes(SYNC, "acme", cursor=cursor, limit=1000)
        assert len(page.records) == 12 and {c.last_action for c in page.records} == {"deleted"}

    # The next poll, without a checkpoint, fetches everything: the provider still has them all.
    polled = run(instance, mode="incremental")
    assert polled.success and materialization(polled)["added"] == 12

    removed = reset("--empty-records", "--remove", "--yes")
    assert removed.exit_code == 0, removed.output
    assert "12 records removed" in removed.output
    with Store(database_url) as store:
        assert store.count(SYNC, "acme", include_deleted=True) == 0
        assert store.changes(SYNC, "acme", cursor=cursor).reset.removed == 12  # type: ignore[union-attr]
        assert [r.records for r in store.resets.list(SYNC, "acme")] == ["kept", "tombstoned", "removed"]
        assert all(r.requested_by.startswith("cli:") for r in store.resets.list(SYNC, "acme"))


def test_reset_refuses_while_a_run_holds_the_poll_lease_and_bad_arguments(instance, acme, database_url) -> None:  # noqa: F811
    assert run(instance, mode="full").success
    with Store(database_url) as store, store.leases.hold(SYNC, "acme", "poll", "run-that-polls"):
        held = reset("--empty-records", "--yes")
        assert held.exit_code == 1
        assert "another run (run-that-polls) holds the poll lease of sandbox/contacts" in held.output
        assert "Traceback" not in held.output
        assert store.count(SYNC, "acme") == 12 and store.state.get(SYNC, "acme").checkpoint  # type: ignore[union-attr]

    unknown = CliRunner().invoke(main, ["syncs", "reset", "sandbox/nope", "acme"])
    assert unknown.exit_code == 1 and "unknown sync 'sandbox/nope'" in unknown.output
    model = CliRunner().invoke(main, ["syncs", "reset", "github/issue_comments", "acme"])
    assert model.exit_code == 1 and "is a model of github/issues" in model.output
    missing = CliRunner().invoke(main, ["syncs", "reset", SYNC, "globex"])
    assert missing.exit_code == 1 and "no connection 'globex'" in missing.output
    lonely = reset("--remove")
    assert lonely.exit_code == 2 and "--remove only applies with --empty-records" in lonely.output


def test_reset_from_the_ui_through_run_config(instance, acme, database_url) -> None:  # noqa: F811
    assert run(instance, mode="full").success
    unconfirmed = run(instance, mode="reset", empty_records="tombstone")
    assert not unconfirmed.success
    [failure] = [e for e in unconfirmed.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert "set confirm: 'acme' in the run config" in str(failure.step_failure_data.user_failure_data.description)  # type: ignore[union-attr]
    with Store(database_url) as store:
        assert store.count(SYNC, "acme") == 12

    done = run(instance, mode="reset", empty_records="tombstone", confirm="acme")
    assert done.success
    metadata = materialization(done)
    assert (metadata["mode"], metadata["records"], metadata["tombstoned"], metadata["deleted"]) == (
        "reset",
        "tombstoned",
        12,
        12,
    )
    assert metadata["checkpoint_cleared"] is True and metadata["dagster/row_count"] == 0
    with Store(database_url) as store:
        assert store.state.get(SYNC, "acme").checkpoint is None  # type: ignore[union-attr]
        [entry] = store.resets.list(SYNC, "acme")
        assert entry.requested_by == done.run_id

    # Paused connections can be reset (nothing is fetched), and a poll held off the partition
    # refuses the reset run after its wait, having changed nothing.
    assert CliRunner().invoke(main, ["connections", "pause", "sandbox", "acme"]).exit_code == 0
    assert run(instance, mode="reset").success
    with Store(database_url) as store, store.leases.hold(SYNC, "acme", "poll", "run-that-polls"):
        blocked = run(instance, mode="reset", poll_lease_wait_s=0)
        assert not blocked.success
        assert len(store.resets.list(SYNC, "acme")) == 2
