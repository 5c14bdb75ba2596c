"""deploy/celery/ across hosts: Celery run workers on two network-namespace hosts, a backfill and a
stream of signed webhooks, then one host SIGKILLed mid-backfill.

The hosts are real enough to matter: each worker lives in its own network namespace and reaches
Postgres (Dagster's storage and the records), RabbitMQ, Redis and the sandbox only across its veth
link (support/hosts.py). The webserver, the daemon and two receivers (each ``--workers 2``,
behind a round-robin balancer) run on this host. What must hold:

- every backfill partition ends with a successful run, and runs ran on both workers;
- a run whose host died is failed by run monitoring within its dagster/max_runtime (the Celery
  task state of a host that died whole stays STARTED, so the health check cannot see it: the
  runtime limit is the bound), and run retries re-run it on the surviving worker;
- one run per partition throughout (the lease table sampled every 0.25 s): tokens only grow, no
  token has two holders, and a retried partition's new run holds a newer token than any that
  partition's poll lease had when the host died;
- the store equals the sandbox's truth, with no tombstone the sandbox did not delete.
"""

from __future__ import annotations

import re
import threading
import time
from collections import defaultdict
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType

from sync_project.store import Store
from sync_project_tests.conftest import IN_CI
from sync_project_tests.support.realtime import sandbox_syncs, stored_state
from sync_project_tests.support.scale_out import ScaleOutDeployment, unavailable_reason

#: A killed run is failed once this is up (its dagster/max_runtime tag); runs here take seconds.
MAX_RUNTIME_S = 60
POLL_INTERVAL_S = 5
MONITORING_FAILURES = ("Exceeded maximum runtime", "Detected run worker status")
#: As the README tells operators to launch backfills. ALL_STEPS: a host killed after a run's
#: step succeeded but before the run's success was written leaves a failed run with nothing to
#: re-run "from failure" (Dagster's default), and the retry daemon gives up on it for good ("No
#: steps needed to be retried in the failed run").
BACKFILL_TAGS = {
    "dagster/max_runtime": str(MAX_RUNTIME_S),
    "dagster/max_retries": "2",
    "dagster/retry_strategy": "ALL_STEPS",
}


@pytest.fixture
def deployment(tmp_path: Path):
    problem = unavailable_reason()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI requires the scale-out test)", pytrace=False)
        pytest.skip(problem)
    # Five run slots a host: a standby drainer and the two streamed partitions' standing drainers are
    # long-lived runs, and the survivor must still have room for backfill runs once it is alone.
    deployment = ScaleOutDeployment(
        tmp_path / "deployment",
        workers=2,
        concurrency=5,
        accounts=12,
        contacts=50,
        monitoring={
            "poll_interval_seconds": POLL_INTERVAL_S,
            "start_timeout_seconds": 90,
            "max_runtime_seconds": 2 * MAX_RUNTIME_S,
        },
    )
    try:
        yield deployment.start()
    finally:
        deployment.close()


class LeaseWatch:
    """Samples every lease all along: tokens must only grow, and a token has one holder."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.holders: dict[tuple[str, str, str, int], set[str]] = defaultdict(set)
        self.last_token: dict[tuple[str, str, str], int] = {}
        self.regressions: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for lease in self.store.leases.list():
                key = (lease.sync, lease.connection_id, lease.role)
                if lease.token < self.last_token.get(key, 0):
                    self.regressions.append(f"{key}: token {lease.token} after {self.last_token[key]}")
                self.last_token[key] = max(lease.token, self.last_token.get(key, 0))
                if lease.holder is not None:
                    self.holders[(*key, lease.token)].add(lease.holder)
            self.samples += 1

    def token_of(self, key: tuple[str, str, str], holder: str) -> int | None:
        """The token ``holder`` was seen holding ``key`` with (None: never seen holding it)."""
        tokens = [k[3] for k, holders in self.holders.items() if k[:3] == key and holder in holders]
        return max(tokens) if tokens else None

    def __enter__(self) -> LeaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def granted_token(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The lease token the run logged when it was granted its lease ("holding the ... (token N)")."""
    for entry in instance.all_logs(run_id):
        found = re.search(r"holding the \w+ lease of .* \(token (\d+)\)", entry.user_message or "")
        if found:
            return int(found.group(1))
    return None


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str:
    events = instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    return " | ".join(event.message for event in events)


def retry_decision(instance: dg.DagsterInstance, run_id: str) -> str:
    """Why a failed run was or was not retried: its will-retry tag and the daemon's engine events
    (it skips, for one, a run whose backfill had already reached a terminal status)."""
    run = instance.get_run_by_id(run_id)
    tags = {k: v for k, v in (run.tags if run else {}).items() if k in ("dagster/will_retry", "dagster/failure_reason")}
    said = []
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        if "retry" not in str(entry.message).lower():
            continue
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        error = data.error if data is not None else None
        said.append(f"{entry.message}: {error.message.strip()}" if error else str(entry.message))
    return f"{tags} {said}"


def test_a_backfill_spreads_over_two_worker_hosts_and_survives_one_dying(deployment: ScaleOutDeployment) -> None:
    d = deployment
    assert d.instance is not None and d.store is not None
    instance, store = d.instance, d.store
    survivor, doomed = d.worker_hosts
    try:
        with LeaseWatch(store) as watch:
            d.start_webhook_stream(rate_per_s=2.0)
            backfill_id = d.launch_backfill(d.connection_ids, BACKFILL_TAGS)

            def backfill_runs() -> list[dg.DagsterRun]:
                return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

            def on_doomed(status: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
                return [r for r in backfill_runs() if r.status == status and d.task_worker(r) == doomed.celery_name]

            # Mid-backfill: the doomed host has finished a run and is executing a backfill run.
            # A run takes seconds, so one seen running may finish before the kill: the host is
            # frozen first (SIGSTOP), its running backfill runs read, and then it is killed; when
            # none is running once frozen, it thaws and the wait goes on.
            deadline = time.monotonic() + 180
            while True:
                assert time.monotonic() < deadline, f"no backfill run started on {doomed.name}\n{d.tails()}"
                if on_doomed(dg.DagsterRunStatus.STARTED) and on_doomed(dg.DagsterRunStatus.SUCCESS):
                    doomed.host.freeze_all()
                    if on_doomed(dg.DagsterRunStatus.STARTED):
                        break
                    doomed.host.thaw_all()
                time.sleep(0.2)

            killed_at = time.time()
            killed_pids = doomed.host.kill_all()
            tokens_at_kill = dict(watch.last_token)
            assert killed_pids
            # A commit the frozen host had already sent (its run's success, say) lands regardless.
            time.sleep(1)
            in_progress = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            victims = [r for r in in_progress if d.task_worker(r) == doomed.celery_name]
            victim_backfill_runs = [r for r in victims if r.tags.get("dagster/backfill") == backfill_id]
            assert victim_backfill_runs

            deadline = time.monotonic() + 300
            while (status := d.backfill_status(backfill_id)) not in (
                "COMPLETED",
                "COMPLETED_SUCCESS",
                "COMPLETED_FAILED",
                "FAILED",
                "CANCELED",
            ):
                assert time.monotonic() < deadline, f"the backfill did not finish: {status}\n{d.tails()}"
                time.sleep(2)
            assert status in ("COMPLETED", "COMPLETED_SUCCESS"), f"{status}\n{d.tails()}"

            # The changes stop; the last webhooks arrive and drain (a drain killed with the host
            # is failed by monitoring too, and the partition's events drain in a new run).
            d.stop_webhook_stream()
            deadline = time.monotonic() + 240
            while store.inbox.stats().counts.get("pending", 0):
                assert time.monotonic() < deadline, f"{store.inbox.stats()}\n{d.tails()}"
                time.sleep(1)

        # Every partition succeeded; the runs spread over both hosts. A killed run's retry is
        # requested by the retry daemon after monitoring failed it, and may still be running when
        # the backfill already counts every partition as requested: wait for it, boundedly.
        deadline = time.monotonic() + 240
        while True:
            runs = backfill_runs()
            succeeded = {r.tags["dagster/partition"] for r in runs if r.status == dg.DagsterRunStatus.SUCCESS}
            if succeeded == set(d.connection_ids) or time.monotonic() > deadline:
                break
            time.sleep(2)
        missing = set(d.connection_ids) - succeeded
        # A string, not a list: pytest would shorten a list's repr to one line.
        assert not missing, "\n".join(
            [
                str(
                    (
                        r.run_id,
                        r.tags["dagster/partition"],
                        r.status,
                        r.tags.get("dagster/parent_run_id"),
                        failure_message(instance, r.run_id),
                        retry_decision(instance, r.run_id),
                    )
                )
                for r in instance.get_runs()
                if r.tags.get("dagster/partition") in missing
            ]
            + [f"backfill {backfill_id}: {d.backfill_status(backfill_id)}", d.tails()]
        )
        records = {
            r.dagster_run.run_id: r
            for r in instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        }
        workers = {r.run_id: d.task_worker(r) for r in runs}
        all_succeeded = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
        assert {d.task_worker(r) for r in all_succeeded} >= {survivor.celery_name, doomed.celery_name}

        # The dead host's runs were failed by run monitoring, within their bound, and re-run on
        # the survivor by run retries, under a newer lease token.
        for victim in victim_backfill_runs:
            record = records[victim.run_id]
            assert record.dagster_run.status == dg.DagsterRunStatus.FAILURE, victim.run_id
            message = failure_message(instance, victim.run_id)
            assert any(reason in message for reason in MONITORING_FAILURES), message
            assert record.end_time is not None and record.start_time is not None
            assert record.end_time - record.start_time <= MAX_RUNTIME_S + 3 * POLL_INTERVAL_S, message
            retries = [r for r in runs if r.tags.get("dagster/parent_run_id") == victim.run_id]
            assert len(retries) == 1, (victim.run_id, [r.run_id for r in retries])
            retry = records[retries[0].run_id]
            assert retry.dagster_run.status == dg.DagsterRunStatus.SUCCESS
            assert workers[retry.dagster_run.run_id] == survivor.celery_name
            assert retry.start_time is not None and retry.start_time >= record.end_time
            # The victim may have died before it took its lease; whatever it held, the retry's
            # grant is newer than every token of that partition's poll lease at the kill.
            key = ("sandbox/contacts", victim.tags["dagster/partition"], "poll")
            # A one-page poll may hold its lease for less than the watch's sampling interval;
            # its log then says which token it was granted.
            after = watch.token_of(key, retry.dagster_run.run_id) or granted_token(instance, retry.dagster_run.run_id)
            assert after is not None and after > tokens_at_kill.get(key, 0), (key, watch.holders)
            before = watch.token_of(key, victim.run_id)
            assert before is None or before < after
        # Nothing ran on the dead host after it died.
        for run in runs:
            record = records[run.run_id]
            if record.start_time is not None and record.start_time > killed_at + 1:
                assert workers[run.run_id] == survivor.celery_name, run.run_id
        # A webhook run that died with the host is a standing drainer whose dagster/max_runtime
        # (run_limits.webhook_max_runtime, over 10 min) outlasts this test: its partition must not
        # wait for that. Either monitoring failed it already, or a replacement drainer took over
        # its partition on the survivor after the kill (the sensor requests one once the dead
        # drainer's lease expired).
        webhook_runs = instance.get_run_records(filters=dg.RunsFilter(tags={"sync/mode": "webhook"}))
        for victim in victims:
            if victim.tags.get("dagster/backfill") == backfill_id:
                continue
            if instance.get_run_by_id(victim.run_id).status == dg.DagsterRunStatus.FAILURE:  # type: ignore[union-attr]
                continue
            if "sync/mode" not in victim.tags:
                # Another run (a warehouse load requested by automation): run monitoring fails it
                # once the instance's max_runtime_seconds is up.
                deadline = time.monotonic() + 2 * MAX_RUNTIME_S + 6 * POLL_INTERVAL_S
                while instance.get_run_by_id(victim.run_id).status != dg.DagsterRunStatus.FAILURE:  # type: ignore[union-attr]
                    assert time.monotonic() < deadline, f"{victim.run_id} died with the host and was left running"
                    time.sleep(2)
                continue
            if victim.tags.get("sync/mode") == "standby":
                # The provider's standby drainer: the standby sensor replaces it once its
                # standby lease expired, on the survivor.
                def standby_replaced(victim: dg.DagsterRun = victim) -> bool:
                    standbys = instance.get_run_records(
                        filters=dg.RunsFilter(
                            tags={"sync/mode": "standby", "sync/standby": victim.tags["sync/standby"]}
                        )
                    )
                    return any(
                        r.start_time is not None
                        and r.start_time > killed_at
                        and d.task_worker(r.dagster_run) == survivor.celery_name
                        for r in standbys
                    )

                deadline = time.monotonic() + 120
                while not standby_replaced():
                    assert time.monotonic() < deadline, (
                        f"standby {victim.run_id} died with the host and was not replaced"
                    )
                    time.sleep(1.0)
                continue
            assert victim.tags.get("sync/mode") == "webhook", f"{victim.run_id} died with the host and was left running"
            partition = victim.tags["dagster/partition"]
            replacements = [
                r
                for r in webhook_runs
                if r.dagster_run.tags.get("dagster/partition") == partition
                and r.dagster_run.tags.get("sync/asset_partition", "").split(":")[0]
                == victim.tags.get("sync/asset_partition", "").split(":")[0]
                and r.start_time is not None
                and r.start_time > killed_at
                and d.task_worker(r.dagster_run) == survivor.celery_name
            ]
            if not replacements:
                # Or the provider's standby took the partition over (it drains a partition that has
                # no drainer, and records that partition's materializations as it does).
                sync_key = victim.tags.get("sync/asset_partition", "").split(":")[0]
                drained_after = instance.fetch_materializations(
                    dg.AssetRecordsFilter(
                        asset_key=dg.AssetKey(sync_key.split("/")),
                        asset_partitions=[partition],
                        after_timestamp=killed_at,
                    ),
                    limit=50,
                ).records
                replacements = [
                    record
                    for record in drained_after
                    if (run := instance.get_run_by_id(record.run_id)) is not None
                    and run.tags.get("sync/mode") == "standby"
                    and d.task_worker(run) == survivor.celery_name
                ]
            assert replacements, f"{victim.run_id} died with the host and nothing drained {partition} after it"

        # One run per partition: tokens never went back, and no token had two holders.
        assert watch.samples > 10 and watch.regressions == []
        shared = {key: holders for key, holders in watch.holders.items() if len(holders) > 1}
        assert shared == {}

        # The store is the sandbox's truth: what is live, and exactly the deletes it made.
        contacts = next(sync for sync in sandbox_syncs() if sync.name == "contacts")
        for connection_id in d.connection_ids:
            truth = d.admin.truth(d.account_of[connection_id])
            live, deleted = stored_state(store, contacts.key, connection_id)
            expected = {o["id"]: contacts.model.model_validate(o).model_dump(mode="json") for o in truth["contacts"]}
            assert live == expected, connection_id
            assert deleted == set(truth["deleted"]["contacts"]), connection_id
        # Both receivers took deliveries.
        assert len([url for url, count in d.served.items() if count > 0]) == d.receivers, d.served
    except AssertionError:
        print(d.tails())
        raise
