"""Standing drainers under a real ``dagster-daemon``: webhooks for three connections flow while a
poll of each of their partitions is in progress; a drainer's successor takes over before its cap;
a drainer whose worker is SIGKILLed is replaced once its lease expires, long before run
monitoring would fail its run. Every event is applied, each webhook run records materializations
as its batches commit, and no partition is left without a drainer. A quiet partition's first
event is drained by the provider's standby drainer before any run is started for it, and a
SIGKILLed standby is replaced. The daemon launches every run
(the sensor's and the polls, through the queue) with the project's dagster.yaml; records are on
Postgres, so drainers are woken by NOTIFY.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import dagster as dg
import pytest
import yaml

from sync_project import settings
from sync_project.orchestration.partitions import DRAIN_PARTITION_TAG, concurrency_tag
from sync_project.orchestration.standby import standby_lease_key
from sync_project.orchestration.standby_job import STANDBY_SLOTS
from sync_project.store import Store
from sync_project_tests.orchestration import standing_drainer_location
from sync_project_tests.orchestration.test_killed_run import BIN, ROOT, _stop, wait_for, worker_pid
from sync_project_tests.support.realtime import RealtimeHarness, stored_state

#: The test's own polls (the poll schedule may add its own when a quarter hour passes).
TEST_POLL = {"test/poll": "standing"}
CONNECTIONS = {"demo-1": "acct-1", "demo-2": "acct-2", "demo-3": "acct-3"}
#: A connection without traffic until its one event: no drainer run stands for it.
QUIET = ("demo-4", "acct-4")
SYNC = "sandbox/contacts"
#: Webhook traffic lasts this long: beyond a drainer's cap (24 s), so successors take over.
TRAFFIC_S = 55.0
#: From a drainer's kill to a new run holding its partition's drain lease: the lease's TTL (30 s)
#: and the dead-lease grace, a sensor tick (5 s), the queue and a run start on a busy machine
#: (40 s and more seen with five test suites sharing two cores). The standby is killed with it.
REPLACED_WITHIN_S = 120.0


def drain_runs(instance: dg.DagsterInstance, connection_id: str) -> list[dg.RunRecord]:
    return list(instance.get_run_records(filters=dg.RunsFilter(tags={DRAIN_PARTITION_TAG: f"{SYNC}:{connection_id}"})))


def live_holder(store: Store, sync: str, connection_id: str, role: str) -> str | None:
    """The run holding the lease, while it is unexpired."""
    for lease in store.leases.list(sync):
        if lease.connection_id == connection_id and lease.role == role and lease.holder and lease.expires_at:
            expires = lease.expires_at if lease.expires_at.tzinfo else lease.expires_at.replace(tzinfo=timezone.utc)
            if expires.timestamp() > time.time():
                return lease.holder
    return None


def drain_holder(store: Store, connection_id: str) -> str | None:
    return live_holder(store, SYNC, connection_id, "drain")


def standby_holder(store: Store) -> str | None:
    """The sandbox standby drainer that holds its lease (any slot)."""
    return next(
        (
            h
            for slot in range(STANDBY_SLOTS)
            if (h := live_holder(store, *standby_lease_key("sandbox", slot), "standby"))
        ),
        None,
    )


def mode_of(instance: dg.DagsterInstance, run_id: str | None) -> str | None:
    record = instance.get_run_record_by_id(run_id) if run_id else None
    return record.dagster_run.tags.get("sync/mode") if record else None


def partition_drainer(store: Store, instance: dg.DagsterInstance, connection_id: str) -> str | None:
    """The partition's own drainer run (a webhook run, not the standby) holding its drain lease."""
    holder = drain_holder(store, connection_id)
    return holder if mode_of(instance, holder) == "webhook" else None


@pytest.fixture
def daemon_env(tmp_path: Path, postgres_url: str) -> Iterator[tuple[dict[str, str], Path]]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    workspace = tmp_path / "workspace.yaml"
    location = {
        "relative_path": standing_drainer_location.__file__,
        "working_directory": str(ROOT),
        "location_name": "standing",
    }
    workspace.write_text(yaml.safe_dump({"load_from": [{"python_file": location}]}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "SYNC_DATABASE_URL": postgres_url}
    env.pop("SYNC_NOTIFY_URL", None)
    yield env, workspace


def first_materialization(instance: dg.DagsterInstance, connection_id: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(SYNC.split("/")), asset_partitions=[connection_id]),
        limit=1,
        ascending=True,
    ).records
    return records[0] if records else None


def launch_poll(env: dict[str, str], workspace: Path, connection_id: str) -> None:
    """An incremental poll of the partition, submitted to the daemon's queue as a schedule's is."""
    tags = {
        **concurrency_tag(SYNC, connection_id, "poll"),
        "dagster/partition": connection_id,
        "sync/mode": "incremental",
        **TEST_POLL,
    }
    config = {"ops": {"sandbox__contacts": {"config": {"mode": "incremental"}}}}
    subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "launch",
            "-w",
            str(workspace),
            "-j",
            "sandbox__contacts_job",
            "--tags",
            json.dumps(tags),
            "--config-json",
            json.dumps(config),
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.timeout(420)
def test_standing_drainers_apply_every_event_beside_polls_and_survive_a_killed_run(daemon_env, monkeypatch) -> None:
    env, workspace = daemon_env
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    log = Path(env["DAGSTER_HOME"]) / "daemon.log"
    with Store(env["SYNC_DATABASE_URL"]) as store, dg.DagsterInstance.get() as instance:
        harness = RealtimeHarness(store, instance)
        daemon: subprocess.Popen[bytes] | None = None
        stop = threading.Event()
        producer: threading.Thread | None = None
        try:
            for connection_id, account_id in [*CONNECTIONS.items(), QUIET]:
                harness.connect(connection_id, account_id)  # sets the connection's token in os.environ
            env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("TEST_SANDBOX_TOKEN_")}}
            with log.open("ab") as out:
                daemon = subprocess.Popen(
                    [str(BIN / "dagster-daemon"), "run", "-w", str(workspace)],
                    env=env,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            started = time.monotonic()
            launches = [
                threading.Thread(target=launch_poll, args=(env, workspace, c), name=f"launch {c}") for c in CONNECTIONS
            ]
            for launch in launches:
                launch.start()
            for launch in launches:
                launch.join(150)

            def polls_in_progress() -> bool:
                running = instance.get_run_records(
                    filters=dg.RunsFilter(tags=TEST_POLL, statuses=[dg.DagsterRunStatus.STARTED])
                )
                return len(running) == len(CONNECTIONS)

            wait_for("a poll of every partition to be running", polls_in_progress, started + 180, daemon, log)

            def keep_changing() -> None:
                # Contacts only (deal_share 0): the code location syncs nothing else.
                ends = time.monotonic() + TRAFFIC_S
                while not stop.is_set() and time.monotonic() < ends:
                    for account_id in CONNECTIONS.values():
                        harness.admin.apply_changes(2, account_id=account_id, deal_share=0)
                    stop.wait(0.5)

            producer = threading.Thread(target=keep_changing, name="webhook traffic")
            producer.start()
            for c in CONNECTIONS:
                wait_for(
                    f"a batch of {c} applied",
                    lambda c=c: first_materialization(instance, c),
                    time.monotonic() + 90,
                    daemon,
                    log,
                )
            # The polls are still running: webhooks did not wait for them.
            assert polls_in_progress()
            holders = {
                c: wait_for(
                    f"a drainer of {c}",
                    lambda c=c: partition_drainer(store, instance, c),
                    time.monotonic() + 90,
                    daemon,
                    log,
                )
                for c in CONNECTIONS
            }

            # The quiet partition's first event is drained by the provider's standby, which is
            # already up: no run is started for it first.
            standby = wait_for("the standby drainer", lambda: standby_holder(store), time.monotonic() + 60, daemon, log)
            quiet_id, quiet_account = QUIET
            harness.admin.apply_changes(1, account_id=quiet_account, create=1, update=0, delete=0, deal_share=0)
            first = wait_for(
                "the quiet partition's first materialization",
                lambda: first_materialization(instance, quiet_id),
                time.monotonic() + 60,
                daemon,
                log,
            )
            assert mode_of(instance, first.run_id) == "standby"
            started_before = [
                r
                for r in drain_runs(instance, quiet_id)
                if r.start_time is not None and r.start_time <= first.timestamp
            ]
            assert not started_before, "a drain run was started for the quiet partition before its event was applied"

            victim = "demo-2"
            dead_run = holders[victim]
            worker = wait_for(
                "the drainer's pid", lambda: worker_pid(instance, dead_run), time.monotonic() + 30, daemon, log
            )
            standby = standby_holder(store) or standby
            standby_worker = wait_for(
                "the standby's pid", lambda: worker_pid(instance, standby), time.monotonic() + 30, daemon, log
            )
            os.kill(worker, signal.SIGKILL)
            os.kill(standby_worker, signal.SIGKILL)
            killed_at = time.monotonic()
            replacement = wait_for(
                "a new drainer of the killed run's partition",
                lambda: (h := drain_holder(store, victim)) and h != dead_run and h,
                killed_at + REPLACED_WITHIN_S,
                daemon,
                log,
            )
            wait_for(
                "a new standby",
                lambda: (h := standby_holder(store)) and h != standby and h,
                killed_at + REPLACED_WITHIN_S,
                daemon,
                log,
            )
            # The new drainer took the dead one's expired lease: a replacement, the successor the
            # sensor had requested if the dead drainer was near its cap, or the run the next
            # events asked for once the code server had reported the worker's death.
            # (or the standby, draining it until the partition's own drainer takes over).
            assert mode_of(instance, replacement) in ("webhook", "standby")

            producer.join(TRAFFIC_S + 30)
            assert harness.admin.flush().pending == 0

            def drained() -> bool:
                # Every partition still has a drainer: its own (they linger 60 s, handed to a
                # successor at their 24 s cap), or the standby while a successor starts.
                return store.inbox.count(status="pending", sync=SYNC) == 0 and all(
                    partition_drainer(store, instance, c) or standby_holder(store) for c in CONNECTIONS
                )

            wait_for("every event applied", drained, time.monotonic() + 60, daemon, log)
            polls_done = lambda: all(  # noqa: E731
                r.dagster_run.status == dg.DagsterRunStatus.SUCCESS
                for r in instance.get_run_records(filters=dg.RunsFilter(tags=TEST_POLL))
            )
            wait_for("the polls to succeed", polls_done, time.monotonic() + 60, daemon, log)
            truth = {account_id: harness.admin.truth(account_id) for account_id in CONNECTIONS.values()}
            runs = {c: drain_runs(instance, c) for c in CONNECTIONS}
            standbys = list(instance.get_run_records(filters=dg.RunsFilter(tags={"sync/mode": "standby"})))
            materializations = {
                r.dagster_run.run_id: len(
                    instance.all_logs(r.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
                )
                for r in [*(r for rs in runs.values() for r in rs), *standbys]
            }
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            if producer is not None:
                producer.join(30)
            if daemon is not None:
                _stop(daemon)
            harness.close()

        assert stored_state(store, SYNC, quiet_id)[0], "the quiet partition's event was not applied"
        counts = store.inbox.stats().counts
        assert counts["pending"] == counts["dead"] == 0 and counts["done"] > 0
        contacts = next(s for s in harness.syncs if s.key == SYNC)
        for connection_id, account_id in CONNECTIONS.items():
            live, deleted = stored_state(store, SYNC, connection_id)
            expected = {
                o["id"]: contacts.model.model_validate(o).model_dump(mode="json") for o in truth[account_id]["contacts"]
            }
            assert live == expected, connection_id
            assert deleted == set(truth[account_id]["deleted"]["contacts"])
        # A standing drainer is one run per cap, not one per event: a first drainer, its successor(s)
        # (about one per 12 s of traffic beyond the first 12 s), the replacement of the killed one.
        successors = [r for rs in runs.values() for r in rs if "sync/successor_of" in r.dagster_run.tags]
        assert successors, "no drainer was handed over to a successor"
        for connection_id, records in runs.items():
            assert 2 <= len(records) <= 2 + int(elapsed // 12), (connection_id, len(records))
        # Materializations as batches commit, before the run's own at its end (a drainer's, or
        # the standby's, which records each partition it drains).
        assert max(materializations.values()) >= 3, materializations
