"""``make run`` (``sync-project dev``) as a person runs it: everything starts, webhook runs happen
through the real Dagster daemon, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
from dagster._core.instance.ref import InstanceRef

from sync_project import settings
from sync_project.cli.dev import BACKFILL_WAITS_FOR_CODE_ENV, missing_run_monitoring, missing_warehouse_pool
from sync_project.store import Store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, frontier = set(), [pid]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def daemon_pids(pids: set[int]) -> list[int]:
    """dagster dev's daemon: ``python -m dagster._daemon run``."""
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dagster._daemon" in argv and b"run" in argv:
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_dev_runs_everything_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    data, home = tmp_path / "data", tmp_path / "dagster_home"
    env = {**os.environ, "SYNC_DATA_DIR": str(data), "DAGSTER_HOME": str(home)}
    env.pop("SYNC_DATABASE_URL", None)
    ports = [str(free_port()) for _ in range(3)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sync_project.cli",
            "dev",
            "--ui-port",
            ports[0],
            "--receiver-port",
            ports[1],
            "--sandbox-port",
            ports[2],
            "--change-rate",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops everything" in line for line in output):
            assert time.monotonic() < deadline, "".join(output)
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(output)
            output.append(line)
        text = "".join(output)
        assert f"http://127.0.0.1:{ports[0]}" in text and "demo-1 (acct-1)" in text
        assert "tok_" not in text and "whsec_" not in text  # secrets are never printed

        # Webhooks from the sandbox reach the store through the sensor and daemon-launched runs.
        with Store(f"sqlite:///{data / 'sync.db'}") as store:
            deadline = time.monotonic() + 180
            while store.inbox.stats().counts["done"] == 0:
                started |= descendants(process.pid)
                assert time.monotonic() < deadline, "no webhook run finished in time"
                time.sleep(2)
            assert store.count("sandbox/contacts") + store.count("sandbox/deals") > 0
        started |= descendants(process.pid)
        assert len(started) >= 4  # receiver, sandbox, dagster dev and its webserver/daemon
        # The daemon retries a backfill whose code location is briefly unloadable (dev.py).
        daemons = daemon_pids(started)
        assert daemons, "no dagster daemon among dev's processes"
        assert all(environ_of(pid).get(BACKFILL_WAITS_FOR_CODE_ENV) == "1" for pid in daemons)
        # A standing drainer lingers for minutes after its events, and the provider's standby drainer
        # runs all along (it may have drained the first events before any partition's drainer
        # started): the stop comes during a drain.
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            deadline = time.monotonic() + 120
            while True:
                draining = [
                    record
                    for mode in ("webhook", "standby")
                    for record in instance.get_run_records(
                        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={"sync/mode": mode})
                    )
                ]
                if draining or time.monotonic() > deadline:
                    break
                time.sleep(1)
            # Runs that ended before the stop are not the stop's doing (a poll may fail under load).
            ended_before = {run.run_id for run in instance.get_runs() if run.is_finished}
        assert draining, "no drainer run in progress to stop"
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    assert process.returncode == 0, rest
    assert "stopped: receiver, sandbox, dagster" in rest
    assert "canceled" in rest and "run(s) in progress" in rest
    # The stop failed no run: each one in progress (or launched during it) ended canceled or succeeded.
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        runs = instance.get_runs()
        statuses = {run.run_id: run.status for run in runs}
        # The sync runs (polls, drains, checks); and none of any kind failed as interrupted by it.
        failed = [
            run.run_id
            for run in runs
            if run.status == dg.DagsterRunStatus.FAILURE
            and run.run_id not in ended_before
            and (
                "sync/mode" in run.tags
                or any("interrupted unexpectedly" in (e.message or "") for e in instance.all_logs(run.run_id))
            )
        ]
        assert not failed, [
            (run_id, [e.message for e in instance.all_logs(run_id) if e.is_dagster_event][-3:]) for run_id in failed
        ]
        assert all(
            statuses[r.dagster_run.run_id] in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.SUCCESS)
            for r in draining
        ), statuses
    assert "DagsterCodeLocationNotFoundError" not in (data / "logs" / "dagster.log").read_text()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in started if alive(pid)]


def test_dev_warns_when_dagster_home_predates_run_monitoring(tmp_path: Path) -> None:
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # a home made before
    warning = missing_run_monitoring(tmp_path) or ""
    assert "run_monitoring" in warning and f"cp {settings.INSTANCE_TEMPLATE}" in warning
    assert "concurrency.pools" in (missing_warehouse_pool(tmp_path) or "")
    (tmp_path / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    assert missing_run_monitoring(tmp_path) is None
    assert missing_warehouse_pool(tmp_path) is None
