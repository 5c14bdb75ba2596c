"""The daemons deploy/ ships start as `make run`'s does: a backfill whose code location is briefly
unloadable waits for it instead of failing for good (sync_project.cli.dev)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from sync_project import settings
from sync_project.cli.dev import BACKFILL_WAITS_FOR_CODE_ENV

DEPLOY = settings.project_root() / "deploy"


def run_celery_daemon(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    """`deploy/celery/run.sh daemon` for real, with a stand-in dagster-daemon on PATH that records
    the value it was started with and its arguments."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    stand_in = bin_dir / "dagster-daemon"
    stand_in.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "${{{BACKFILL_WAITS_FOR_CODE_ENV}-unset}}" "$@" > {shlex.quote(str(record))}\n'
    )
    stand_in.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != BACKFILL_WAITS_FOR_CODE_ENV}
    subprocess.run(
        ["bash", str(DEPLOY / "celery" / "run.sh"), "daemon"],
        env={**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DAGSTER_HOME": str(tmp_path), **env},
        check=True,
        timeout=30,
    )
    value, *argv = record.read_text().splitlines()
    return value, argv


def test_the_celery_daemon_waits_for_an_unloadable_code_location(tmp_path):
    value, argv = run_celery_daemon(tmp_path)
    assert value == "1"
    assert argv == ["run", "-w", str(DEPLOY / "celery" / "workspace.yaml")]


@pytest.mark.parametrize("preset", ["", "0", "yes"])
def test_the_celery_daemon_keeps_a_value_set_beforehand(tmp_path, preset):
    # "" turns the retry off (Dagster reads the variable as truthy or not).
    value, _ = run_celery_daemon(tmp_path, **{BACKFILL_WAITS_FOR_CODE_ENV: preset})
    assert value == preset


def test_the_kubernetes_daemon_waits_for_an_unloadable_code_location():
    daemon = yaml.safe_load((DEPLOY / "k8s" / "values.yaml").read_text())["dagsterDaemon"]
    assert {"name": BACKFILL_WAITS_FOR_CODE_ENV, "value": "1"} in daemon["env"]
