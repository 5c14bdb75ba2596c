"""Run monitoring as dagster.yaml and deploy/dagster.yaml configure it, and the bound it puts on a
dead run. What the daemon does with it, for real, is test_killed_run.py."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dagster as dg
import pytest
import yaml

from sync_project import settings
from sync_project.orchestration.partition_run import RunSettings
from sync_project.orchestration.run_limits import RunLimits

ROOT = settings.project_root()
CONFIGS = {"dagster.yaml": settings.INSTANCE_TEMPLATE, "deploy/dagster.yaml": ROOT / "deploy" / "dagster.yaml"}
#: Every instance config the project ships, scale-out included.
SHIPPED = {**CONFIGS, "deploy/celery/dagster.yaml": ROOT / "deploy" / "celery" / "dagster.yaml"}


def monitoring(name: str) -> dict[str, Any]:
    return yaml.safe_load(CONFIGS[name].read_text())["run_monitoring"]


def test_both_instance_configs_monitor_runs_alike():
    assert monitoring("dagster.yaml") == monitoring("deploy/dagster.yaml")


@pytest.mark.parametrize("name", CONFIGS)
def test_a_webhook_run_whose_worker_died_is_failed_within_fifteen_minutes(name):
    # The default launcher cannot check a worker's health: only the run's own time limit ends a
    # dead run, enforced within one monitoring interval of expiring. A standing drainer's limit is
    # long (its cap is 10 min), but its partition does not wait for it: the inbox sensor replaces a
    # drainer whose lease expired in another drain slot (test_standing_drainers.py).
    config = monitoring(name)
    assert config["enabled"] is True and config["max_resume_run_attempts"] == 0
    bound_s = RunLimits().webhook_max_runtime.total_seconds() + config["poll_interval_seconds"]
    assert bound_s < 900
    # A run whose process never came up is failed too, and one that will not stop is marked canceled.
    assert 0 < config["start_timeout_seconds"] <= 180 and 0 < config["cancel_timeout_seconds"] <= 180


def test_the_embedded_instance_runs_the_monitoring_daemon_with_these_settings():
    overrides = yaml.safe_load(CONFIGS["dagster.yaml"].read_text())
    overrides.pop("telemetry", None)
    with dg.instance_for_test(overrides=overrides) as instance:
        assert instance.run_monitoring_enabled
        assert "MONITORING" in instance.get_required_daemon_types()
        config = monitoring("dagster.yaml")
        assert instance.run_monitoring_poll_interval_seconds == config["poll_interval_seconds"]
        # Runs without dagster/max_runtime (UI launches, backfills, full refreshes) get a day.
        assert instance.run_monitoring_max_runtime_seconds == config["max_runtime_seconds"] == 86400


@pytest.mark.parametrize("field", ["webhook_linger_cap", "webhook_margin", "poll_floor"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError, match="positive"):
        RunLimits(**{field: timedelta(0)})


def test_healthy_runs_end_well_before_their_limits():
    # A webhook run may wait out a dead drainer's lease (TTL + 5 s) and then linger up to its cap;
    # a poll may wait for the poll lease: run monitoring must not end either of them while it waits.
    limits, run = RunLimits(), RunSettings()
    drain_wait = timedelta(seconds=run.lease_ttl_s + 5)
    assert limits.webhook_max_runtime - limits.webhook_linger_cap - drain_wait >= timedelta(seconds=30)
    # A successor may wait its whole handoff wait and then drain up to its cap.
    successor_wait = max(drain_wait, limits.handoff_wait)
    assert limits.webhook_max_runtime - limits.webhook_linger_cap - successor_wait >= timedelta(seconds=30)
    # It is requested early enough to start, and waits long enough to outlast the predecessor's lease.
    assert limits.handoff_wait >= limits.handoff_lead + timedelta(seconds=run.lease_ttl_s)
    assert limits.poll_floor >= 2 * timedelta(seconds=run.poll_lease_wait_s)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_instance_config_runs_one_warehouse_step_at_a_time(name):
    """The warehouse assets share one pool; only the instance config caps it. Left out of the
    Celery config, two workers' loads ran at once and failed on the DuckDB file's lock."""
    from sync_project.warehouse.assets import WAREHOUSE_POOL

    config = yaml.safe_load(SHIPPED[name].read_text())["concurrency"]
    assert config["pools"]["default_limit"] == 1, f"the {WAREHOUSE_POOL!r} pool is not capped"
    assert config["pools"]["granularity"] == "op"
    # And one run per partition, however it was launched through the queue.
    assert {"key": "sync/asset_partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in config["runs"][
        "tag_concurrency_limits"
    ]
