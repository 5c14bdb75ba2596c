"""A webhook run's worker and its code server killed with SIGKILL under a real ``dagster-daemon``,
as a host crash would, in the middle of a batch: run monitoring fails the run within its bound,
the inbox sensor requests the partition again (under a new run key: the events are the same), and
a new run (the partition's drainer, or the provider's standby that takes over a partition without
one) applies every event the dead run had claimed. Nothing is stubbed: the daemon launches
runs with the project's dagster.yaml, the sandbox sends signed webhooks to the receiver, the
records are on Postgres.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from sync_project import settings
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG, concurrency_tag
from sync_project.orchestration.run_limits import MAX_RUNTIME_TAG
from sync_project.store import Store
from sync_project_tests.orchestration import killed_run_location
from sync_project_tests.support.realtime import RealtimeHarness, stored_state

ROOT = settings.project_root()
BIN = Path(sys.executable).parent
PARTITION_TAG = concurrency_tag("sandbox/contacts", "demo-1", "drain")
#: Any drain slot's runs of the partition (a successor or replacement queues in another slot).
ANY_SLOT_TAG = {DRAIN_PARTITION_TAG: "sandbox/contacts:demo-1"}
#: Beyond max_runtime + the monitoring interval: the daemon's failed gRPC call to the dead code
#: server and the writes of the failure, on a busy 2-core machine.
FAILURE_SLACK_S = 20.0
#: From the failure to the partition drained: the code server died with the run, and the daemon
#: replaces its code server every 60 s (sensor ticks fail until then); then a sensor tick (5 s), a
#: run start and a 4 s drain. Waiting out the sensor's old two-minute stall would not fit.
DRAIN_AGAIN_S = 75.0

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], deadline: float, daemon: subprocess.Popen[bytes], log: Path
) -> T:
    """``probe()`` once it is truthy; fails at ``deadline`` (monotonic) or if the daemon exits."""
    while True:
        value = probe()
        if value:
            return value
        assert daemon.poll() is None, f"dagster-daemon exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}; daemon log:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def ancestry(pid: int) -> list[int]:
    """``pid`` and its parents, up to init."""
    chain = [pid]
    while chain[-1] > 1:
        stat = Path(f"/proc/{chain[-1]}/stat").read_text()
        chain.append(int(stat[stat.rindex(")") + 2 :].split()[1]))
    return chain


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The run worker's pid, from the engine event its process writes first."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        data = event.engine_event_data if event else None
        if data and "pid" in data.metadata and "Started process for run" in (record.message or ""):
            return int(data.metadata["pid"].value)
    return None


def writing_transactions(engine: sa.Engine, application_name: str) -> int:
    """Sessions of this test's processes inside a transaction that has written and lasts (a claimed
    batch whose handlers run; a lease renewal commits within milliseconds)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
                    "AND state = 'idle in transaction' AND backend_xid IS NOT NULL "
                    "AND now() - xact_start > interval '0.5 seconds'"
                ),
                {"name": application_name},
            ).scalar_one()
        )


@pytest.fixture
def daemon_env(tmp_path: Path, postgres_url: str) -> Iterator[tuple[dict[str, str], str, Path]]:
    application_name = f"killed_run_{uuid.uuid4().hex[:12]}"
    url = f"{postgres_url}&application_name={application_name}"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": killed_run_location.__file__,
                            "working_directory": str(ROOT),
                            "location_name": "killed_run",
                        }
                    }
                ]
            }
        )
    )
    env = {**os.environ, "DAGSTER_HOME": str(home), "SYNC_DATABASE_URL": url}
    env.pop("SYNC_NOTIFY_URL", None)
    yield env, application_name, workspace


@pytest.mark.timeout(400)
def test_a_killed_webhook_run_is_failed_and_its_partition_drains_again(daemon_env, monkeypatch) -> None:
    env, application_name, workspace = daemon_env
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monitoring = yaml.safe_load(settings.INSTANCE_TEMPLATE.read_text())["run_monitoring"]
    assert monitoring["enabled"] is True
    log = Path(env["DAGSTER_HOME"]) / "daemon.log"
    with Store(env["SYNC_DATABASE_URL"]) as store, dg.DagsterInstance.get() as instance:
        harness = RealtimeHarness(store, instance)
        daemon: subprocess.Popen[bytes] | None = None
        try:
            harness.connect("demo-1", "acct-1")  # sets the connection's token in os.environ
            # Contacts only (deal_share 0): the code location syncs nothing else.
            first_wave = harness.admin.apply_changes(16, account_id="acct-1", deal_share=0)
            assert harness.admin.flush().pending == 0
            assert store.inbox.count(status="pending", sync="sandbox/contacts") == len(first_wave)

            with log.open("ab") as out:
                daemon = subprocess.Popen(
                    [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
                    env={**os.environ, **env},
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started = time.monotonic()

            def started_run() -> dg.RunRecord | None:
                records = instance.get_run_records(
                    filters=dg.RunsFilter(tags=PARTITION_TAG, statuses=[dg.DagsterRunStatus.STARTED]), limit=1
                )
                return records[0] if records else None

            record = wait_for("the first webhook run to start", started_run, started + 120, daemon, log)
            run_id = record.dagster_run.run_id
            max_runtime = float(record.dagster_run.tags[MAX_RUNTIME_TAG])
            assert max_runtime == killed_run_location.RUN_LIMITS.webhook_max_runtime.total_seconds()
            worker = wait_for("the run worker's pid", lambda: worker_pid(instance, run_id), started + 150, daemon, log)
            # Only this test's processes: the worker's parent is the code server its daemon started.
            parent = ancestry(worker)[1]
            assert daemon.pid in ancestry(worker) and os.getsid(worker) == os.getsid(parent) == daemon.pid
            assert "api grpc" in cmdline(parent), cmdline(parent)
            wait_for(
                "the run to be inside a batch",
                lambda: writing_transactions(store.engine, application_name) > 0,
                started + 180,
                daemon,
                log,
            )

            os.kill(parent, signal.SIGKILL)  # the parent first: alive, it would report its child's death
            os.kill(worker, signal.SIGKILL)
            killed_at = time.time()
            # Its batch died uncommitted: the events it had claimed are pending, under the same
            # inbox high-water mark and attempts, so under the run key Dagster has already used.
            assert store.inbox.count(status="pending", sync="sandbox/contacts") == len(first_wave)

            assert record.start_time is not None
            bound = record.start_time + max_runtime + monitoring["poll_interval_seconds"] + FAILURE_SLACK_S

            def finished() -> dg.RunRecord | None:
                found = instance.get_run_record_by_id(run_id)
                return found if found and found.dagster_run.is_finished else None

            failed = wait_for(
                "run monitoring to fail the dead run",
                finished,
                time.monotonic() + max(0.0, bound - time.time()),
                daemon,
                log,
            )
            assert failed.dagster_run.status == dg.DagsterRunStatus.FAILURE
            assert failed.end_time is not None and failed.end_time <= bound
            messages = " ".join(r.message or "" for r in instance.all_logs(run_id))
            assert f"maximum runtime of {int(max_runtime)} seconds" in messages

            def drained() -> bool:
                if store.inbox.count(status="pending", sync="sandbox/contacts"):
                    return False
                if instance.get_run_records(
                    filters=dg.RunsFilter(tags=ANY_SLOT_TAG, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
                ):
                    return True
                # Or the provider's standby drained it: it takes over a partition that has events
                # and no drainer, and records that partition's materializations as it goes.
                return any(
                    (run := instance.get_run_by_id(record.run_id)) is not None
                    and run.tags.get("sync/mode") == "standby"
                    for record in instance.fetch_materializations(
                        dg.AssetRecordsFilter(
                            asset_key=dg.AssetKey(["sandbox", "contacts"]),
                            asset_partitions=["demo-1"],
                            after_timestamp=killed_at,
                        ),
                        limit=50,
                    ).records
                )

            wait_for("a new run to drain the partition", drained, time.monotonic() + DRAIN_AGAIN_S, daemon, log)
            truth = harness.admin.truth("acct-1")
        finally:
            if daemon is not None:
                _stop(daemon)
            harness.close()

        counts = store.inbox.stats().counts
        assert (counts["done"], counts["dead"], counts["pending"]) == (len(first_wave), 0, 0)
        contacts = next(s for s in harness.syncs if s.key == "sandbox/contacts")
        live, deleted = stored_state(store, "sandbox/contacts", "demo-1")
        assert live == {o["id"]: contacts.model.model_validate(o).model_dump(mode="json") for o in truth["contacts"]}
        assert live and deleted == set(truth["deleted"]["contacts"])


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(daemon.pid, signal.SIGINT)
        daemon.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
