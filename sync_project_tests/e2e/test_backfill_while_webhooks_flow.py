"""The README's backfill, as a data engineer runs it during ``make run``, while webhooks flow.

``sync-project dev`` runs everything (the sandbox with its change generator on, so webhooks arrive
all the time, the receiver, and ``dagster dev``: webserver, daemon, inbox sensor, webhook runs).
The test then does what a person does: launches an asset backfill over several partitions through
the webserver's GraphQL API, exactly as the UI's "Materialize..." does, and runs ``dagster asset
materialize`` for one partition from a shell. Both must succeed while webhook runs keep applying
events (polls and drains hold different leases), and once the changes stop and the inbox drains,
every record equals the provider's truth. Under the old run lock every backfill run was refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import httpx

from sync_project import settings
from sync_project.sandbox.client import SandboxAdmin
from sync_project.store import Store
from sync_project_tests.cli.test_dev import free_port
from sync_project_tests.support.dagster_ui import BACKFILL_STATUS, LAUNCH_BACKFILL
from sync_project_tests.support.realtime import sandbox_syncs, stored_state

ROOT = settings.project_root()
BIN = Path(sys.executable).parent
PARTITIONS = ["demo-1", "demo-2"]
ACCOUNTS = {"demo-1": "acct-1", "demo-2": "acct-2"}


def graphql(ui_url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{ui_url}/graphql", json={"query": query, "variables": variables}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def failed_webhook_runs(instance: dg.DagsterInstance) -> list[str]:
    records = instance.get_run_records(
        filters=dg.RunsFilter(tags={"sync/mode": "webhook"}, statuses=[dg.DagsterRunStatus.FAILURE])
    )
    return [record.dagster_run.run_id for record in records]


def test_a_backfill_and_a_cli_materialize_succeed_while_webhook_runs_drain(tmp_path: Path) -> None:
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    ports = {name: free_port() for name in ("ui", "receiver", "sandbox")}
    env = {
        **os.environ,
        "SYNC_DATA_DIR": str(data),
        "DAGSTER_HOME": str(home),
        "SYNC_SANDBOX_ADMIN_TOKEN": "adm_backfill_test",
        "SYNC_DEMO_DEMO_1_TOKEN": "tok_backfill_demo_1",
        "SYNC_DEMO_DEMO_2_TOKEN": "tok_backfill_demo_2",
    }
    env.pop("SYNC_DATABASE_URL", None)
    ui_url = f"http://127.0.0.1:{ports['ui']}"
    dev = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync_project.cli",
            "dev",
            "--ui-port",
            str(ports["ui"]),
            "--receiver-port",
            str(ports["receiver"]),
            "--sandbox-port",
            str(ports["sandbox"]),
            "--change-rate",
            "4",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops everything" in line for line in output):
            assert time.monotonic() < deadline, "".join(output)
            line = dev.stdout.readline()  # type: ignore[union-attr]
            assert line or dev.poll() is None, "".join(output)
            output.append(line)
        store = Store(f"sqlite:///{data / 'sync.db'}")
        instance = dg.DagsterInstance.from_config(str(home))
        try:
            deadline = time.monotonic() + 180
            while store.inbox.stats().counts["done"] == 0:  # webhook runs are flowing
                assert time.monotonic() < deadline, "no webhook run finished in time"
                time.sleep(1)

            applied_before = store.inbox.stats().counts["done"]
            launched = graphql(
                ui_url,
                LAUNCH_BACKFILL,
                {
                    "backfillParams": {
                        "assetSelection": [{"path": ["sandbox", "contacts"]}],
                        "partitionNames": PARTITIONS,
                        "fromFailure": False,
                        "allPartitions": False,
                    }
                },
            )["launchPartitionBackfill"]
            assert launched["__typename"] == "LaunchBackfillSuccess", launched
            backfill_id = launched["backfillId"]

            # Meanwhile, from a shell: one partition, in that process (it bypasses the run queue).
            materialized = subprocess.run(
                [
                    str(BIN / "dagster"),
                    "asset",
                    "materialize",
                    "-m",
                    "sync_project.definitions",
                    "--select",
                    "sandbox/contacts",
                    "--partition",
                    "demo-1",
                ],
                env={**env, "SYNC_DATABASE_URL": f"sqlite:///{data / 'sync.db'}"},
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=300,
            )
            assert materialized.returncode == 0, materialized.stderr[-3000:]

            deadline = time.monotonic() + 300
            while True:
                status = graphql(ui_url, BACKFILL_STATUS, {"backfillId": backfill_id})["partitionBackfillOrError"]
                if status.get("status") in ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"):
                    break
                assert time.monotonic() < deadline, f"the backfill did not finish: {status}"
                time.sleep(2)
            applied_meanwhile = store.inbox.stats().counts["done"] - applied_before
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            assert sorted(run.tags["dagster/partition"] for run in runs) == PARTITIONS
            assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs), [(r.run_id, r.status) for r in runs]
            assert status["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), status
            assert applied_meanwhile > 0, "no webhook event was applied while the backfill ran"
            assert failed_webhook_runs(instance) == []

            # The changes stop; the last webhooks arrive and drain; nothing is left behind.
            with SandboxAdmin(f"http://127.0.0.1:{ports['sandbox']}", env["SYNC_SANDBOX_ADMIN_TOKEN"]) as admin:
                admin.set_generator(running=False)
                admin.flush()
                deadline = time.monotonic() + 180
                while store.inbox.stats().counts["pending"]:
                    assert time.monotonic() < deadline, store.inbox.stats()
                    time.sleep(1)
                contacts = next(sync for sync in sandbox_syncs() if sync.name == "contacts")
                for connection_id in PARTITIONS:
                    truth = admin.truth(ACCOUNTS[connection_id])
                    live, deleted = stored_state(store, contacts.key, connection_id)
                    expected = {
                        o["id"]: contacts.model.model_validate(o).model_dump(mode="json") for o in truth["contacts"]
                    }
                    assert live == expected, connection_id
                    assert set(truth["deleted"]["contacts"]) <= deleted, connection_id
        finally:
            instance.dispose()
            store.close()
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.communicate()
