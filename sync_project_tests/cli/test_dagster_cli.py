"""What the README tells data engineers to run: ``dagster asset materialize`` for one partition and
``dagster job backfill`` over several, against the project's own code location, with the runs of
the backfill executed by a real ``dagster-daemon``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_project import settings
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer
from sync_project.sandbox.service import AccountSpec, SandboxConfig
from sync_project.store import Store

ROOT = settings.project_root()
BIN = Path(sys.executable).parent


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    accounts = [AccountSpec(account_id=f"acct-{n}", token=f"token-acct-{n}", contacts=30, deals=5) for n in (1, 2, 3)]
    server = SandboxServer(SandboxConfig(accounts=accounts, rate_limit=RateLimitSettings(enabled=False)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(tmp_path: Path, sandbox: SandboxServer) -> dict[str, str]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(settings.INSTANCE_TEMPLATE.read_text())
    values = {**os.environ, "DAGSTER_HOME": str(home), "SYNC_DATABASE_URL": f"sqlite:///{tmp_path / 'sync.db'}"}
    for n in (1, 2, 3):
        values[f"ACME_{n}_TOKEN"] = f"token-acct-{n}"
    for n in (1, 2, 3):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sync_project.cli",
                "connections",
                "add",
                "sandbox",
                f"acme-{n}",
                "--account-id",
                f"acct-{n}",
                "--credentials-env",
                f"ACME_{n}_TOKEN",
                "--config",
                f"base_url={sandbox.base_url}",
            ],
            env=values,
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
    return values


def test_materialize_one_partition_from_the_command_line(env: dict[str, str], sandbox: SandboxServer) -> None:
    result = subprocess.run(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "sync_project.definitions",
            "--select",
            "sandbox/contacts",
            "--partition",
            "acme-1",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with Store(env["SYNC_DATABASE_URL"]) as store:
        truth = sandbox.sandbox.state.truth("acct-1")
        assert store.count("sandbox/contacts", "acme-1") == len(truth["contacts"]) == 30
        assert store.count("sandbox/contacts", "acme-2") == 0
        state = store.state.get("sandbox/contacts", "acme-1")
        assert state is not None and state.last_mode == "full" and state.last_error is None


def test_backfill_several_partitions_runs_through_the_daemon(env: dict[str, str], sandbox: SandboxServer) -> None:
    submitted = subprocess.run(
        [
            str(BIN / "dagster"),
            "job",
            "backfill",
            "-w",
            str(ROOT / "workspace.yaml"),
            "-j",
            "sandbox__deals_job",
            "--partitions",
            "acme-2,acme-3",
            "--noprompt",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with Store(env["SYNC_DATABASE_URL"]) as store:
            deadline = time.monotonic() + 240

            # A full refresh saves its window with its first page: the run is over once it succeeded.
            def finished(connection_id: str) -> bool:
                state = store.state.get("sandbox/deals", connection_id)
                return state is not None and state.last_success_at is not None

            while not all(finished(c) for c in ("acme-2", "acme-3")):
                assert daemon.poll() is None, "the daemon exited"
                assert time.monotonic() < deadline, "the backfill's runs did not finish"
                time.sleep(1)
            for connection_id, _account_id in (("acme-2", "acct-2"), ("acme-3", "acct-3")):
                assert store.count("sandbox/deals", connection_id) == 5
                assert store.state.get("sandbox/deals", connection_id).last_mode == "full"
            assert store.count("sandbox/deals", "acme-1") == 0
    finally:
        os.killpg(daemon.pid, signal.SIGINT)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
