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
from sync_project_tests.cli.dev_support import Dev, DevPorts, differences, wait_until_applied, wait_until_drained
from sync_project_tests.support.dagster_ui import BACKFILL_STATUS, LAUNCH_BACKFILL

ROOT = settings.project_root()
BIN = Path(sys.executable).parent
PARTITIONS = ["demo-1", "demo-2"]


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
    env = {
        "SYNC_SANDBOX_ADMIN_TOKEN": "adm_backfill_test",
        "SYNC_DEMO_DEMO_1_TOKEN": "tok_backfill_demo_1",
        "SYNC_DEMO_DEMO_2_TOKEN": "tok_backfill_demo_2",
    }
    ports = DevPorts()
    dev = Dev(tmp_path, ports, env=env)
    ui_url = f"http://127.0.0.1:{ports.ui}"
    try:
        dev.wait_for_banner()
        store = Store(dev.store_url)
        instance = dg.DagsterInstance.from_config(str(dev.home))
        try:
            wait_until_applied(store, 1)  # webhook runs are flowing

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
                env={**dev.env, "SYNC_DATABASE_URL": dev.store_url},
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
                assert time.monotonic() < deadline, f"the backfill did not finish: {status}\n{tail(dev)}"
                time.sleep(2)
            applied_meanwhile = store.inbox.stats().counts["done"] - applied_before
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            assert status["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), (
                f"{status}: {backfill_error(instance, backfill_id)}\n{tail(dev)}"
            )
            assert sorted(run.tags["dagster/partition"] for run in runs) == PARTITIONS
            assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs), [(r.run_id, r.status) for r in runs]
            assert applied_meanwhile > 0, "no webhook event was applied while the backfill ran"
            assert failed_webhook_runs(instance) == []

            # The changes stop; the last webhooks arrive and drain; nothing is left behind.
            with SandboxAdmin(ports.sandbox_url, env["SYNC_SANDBOX_ADMIN_TOKEN"]) as admin:
                admin.set_generator(running=False)
                admin.flush()
                wait_until_drained(store)
                # Only contacts were polled in full (by the backfill): deals hold what webhooks brought.
                assert differences(store, admin, kinds={"contacts"}, connections=PARTITIONS) == []
        finally:
            instance.dispose()
            store.close()
    finally:
        dev.stop()


def backfill_error(instance: dg.DagsterInstance, backfill_id: str) -> str:
    """What the daemon recorded against a backfill that did not complete (it ends FAILED on an error)."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        return "no such backfill"
    return backfill.error.to_string() if backfill.error is not None else "no error recorded"


def tail(dev: Dev, lines: int = 80) -> str:
    """The end of ``sync-project dev``'s output: the daemon's account of the backfill."""
    return "".join(dev.lines[-lines:])
