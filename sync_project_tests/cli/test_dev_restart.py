"""The demo survives a restart: ``make run``'s processes stopped with Ctrl-C and started again
leave the records store and the sandbox in agreement.

Issue 20: the store persisted under ``data/`` while the sandbox started fresh in memory, so after a
restart demo-1 held 59 live contacts against 24 in the sandbox. Now the sandbox keeps its data in
``data/sandbox.db``, dev sends its last webhooks before stopping it, and the first poll after the
restart finds the store already equal to the sandbox.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from sync_project.store import Store
from sync_project_tests.cli.dev_support import Dev, DevPorts, differences, wait_until_applied, wait_until_drained

#: Chosen here, so the polls this test runs itself have them (dev keeps preset tokens).
DEMO_TOKENS = {"SYNC_DEMO_DEMO_1_TOKEN": "tok_restart_demo_1", "SYNC_DEMO_DEMO_2_TOKEN": "tok_restart_demo_2"}


def poll_every_demo_partition(dev: Dev) -> dict[tuple[str, str], dict[str, int]]:
    """An incremental run of each demo (sync, connection), in this process but against dev's
    instance and store, as ``dagster asset materialize`` would run it: its merge counts."""
    from sync_project.definitions import defs

    counts = {}
    with dg.DagsterInstance.from_config(str(dev.home)) as instance:
        for job_name in ("sandbox__contacts_job", "sandbox__deals_job"):
            op = job_name.removesuffix("_job")
            for connection_id in ("demo-1", "demo-2"):
                result = defs.resolve_job_def(job_name).execute_in_process(
                    instance=instance,
                    partition_key=connection_id,
                    run_config={"ops": {op: {"config": {"mode": "incremental"}}}},
                )
                [materialization] = result.asset_materializations_for_node(op)
                metadata = {key: value.value for key, value in materialization.metadata.items()}
                counts[(op, connection_id)] = {key: metadata[key] for key in ("added", "updated", "deleted")}
    return counts


def test_a_restart_leaves_the_store_and_the_sandbox_in_agreement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = DevPorts()
    first = Dev(tmp_path, ports, change_rate=4, env=DEMO_TOKENS)
    monkeypatch.setenv("SYNC_DATABASE_URL", first.store_url)
    for name, value in DEMO_TOKENS.items():
        monkeypatch.setenv(name, value)
    try:
        first.wait_for_banner()
        assert "sandbox data: " in first.output and "the sandbox kept its data" not in first.output
        with Store(first.store_url) as store:
            wait_until_applied(store, 10)  # webhooks flow: creates, updates and deletes
            first_polls = poll_every_demo_partition(first)  # the records that predate the webhooks
            assert all(counts["added"] > 0 for counts in first_polls.values()), first_polls
            wait_until_applied(store, store.inbox.stats().counts["done"] + 10)
    finally:
        stopped = first.stop()
    assert first.process.returncode == 0, stopped
    assert (first.data / "sandbox.db").exists()

    second = Dev(tmp_path, ports, change_rate=4, env=DEMO_TOKENS)
    try:
        second.wait_for_banner()
        assert "the sandbox kept its data from the last run (acct-1, acct-2)" in second.output
        with Store(second.store_url) as store, second.admin() as admin:
            wait_until_applied(store, store.inbox.stats().counts["done"] + 10)  # and flow again
            admin.set_generator(running=False)
            admin.flush()
            wait_until_drained(store)
            # The first polls after the restart find nothing the webhooks had not applied ...
            after = poll_every_demo_partition(second)
            assert all(counts == {"added": 0, "updated": 0, "deleted": 0} for counts in after.values()), after
            # ... and the store holds exactly what the sandbox holds.
            assert differences(store, admin) == []
    finally:
        stopped = second.stop()
    assert second.process.returncode == 0, stopped
    # dagster dev starts without warning that a dagster.yaml it will not use is in its folder, or
    # that `dg dev` supersedes it.
    log = (second.data / "logs" / "dagster.log").read_text()
    assert "Found a dagster instance configuration" not in log and "is superseded" not in log
    assert "Launching Dagster services" in log


def test_a_new_sandbox_beside_an_old_store_is_announced_and_the_store_follows_it(tmp_path: Path) -> None:
    """The store holds demo records from a sandbox whose data is gone (a checkout from before the
    sandbox kept its data, or a deleted sandbox.db): dev says so, and a full refresh makes the
    store equal to the new sandbox before the demo starts."""
    from sync_project.syncs.sandbox_contacts import contacts

    ports = DevPorts()
    dev_data = tmp_path / "data"
    dev_data.mkdir()
    stale = [
        {
            "id": f"con_{n:06d}",
            "email": f"old-{n}@example.com",
            "first_name": "Old",
            "last_name": "Sandbox",
            "company": None,
            "updated_at": "2020-01-01T00:00:00.000001Z",
            "created_at": "2020-01-01T00:00:00.000001Z",
        }
        for n in range(1, 41)  # ids the new sandbox issues again (it seeds 25), and some it does not
    ]
    with Store(f"sqlite:///{dev_data / 'sync.db'}") as store:
        store.save(contacts.key, "demo-1", contacts.record_spec, stale)
    dev = Dev(tmp_path, ports, change_rate=0)
    try:
        dev.wait_for_banner()
        assert "the sandbox's data is new" in dev.output and "the store holds 40 records" in dev.output
        with Store(dev.store_url) as store, dev.admin() as admin:
            assert differences(store, admin) == []
            assert store.count(contacts.key, "demo-1") == 25
    finally:
        stopped = dev.stop()
    assert dev.process.returncode == 0, stopped
