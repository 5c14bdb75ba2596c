"""The project's code location loads, and every declared sync becomes an asset, a job and a poller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg

from sync_project import registry
from sync_project.orchestration.assets import job_name, op_name
from sync_project.orchestration.partitions import partitions_name


def test_every_declared_sync_is_built_into_the_code_location() -> None:
    from sync_project.definitions import defs

    with dg.instance_for_test():  # loading consults the current instance; use a throwaway one
        dg.Definitions.validate_loadable(defs)
    syncs = registry.syncs()
    assert {s.key for s in syncs} >= {"github/issues", "hubspot/contacts", "stripe/customers"}
    for sync in syncs:
        asset = defs.resolve_assets_def(dg.AssetKey([sync.provider, sync.name]))
        spec = asset.specs_by_key[dg.AssetKey([sync.provider, sync.name])]
        assert spec.group_name == sync.provider
        assert sync.provider in spec.kinds
        assert asset.partitions_def == dg.DynamicPartitionsDefinition(name=partitions_name(sync.provider))
        assert defs.resolve_job_def(job_name(sync)) is not None
        poller = f"poll_{op_name(sync)}"
        if sync.cron:
            assert defs.resolve_schedule_def(poller).cron_schedule == sync.cron
        else:
            assert defs.resolve_sensor_def(poller).minimum_interval_seconds == int(sync.poll_interval.total_seconds())
    inbox = defs.resolve_sensor_def("inbox_sensor")
    assert inbox.minimum_interval_seconds == 5
    assert inbox.default_status == dg.DefaultSensorStatus.RUNNING


def test_the_code_location_is_a_definitions_function_dagster_loads_lazily() -> None:
    """``@dg.definitions``: importing the module builds nothing; Dagster's loader finds the
    function (and only it), and in-process readers get the same definitions as ``defs``."""
    from dagster._core.workspace.autodiscovery import loadable_targets_from_loaded_module

    import sync_project.definitions as location

    targets = loadable_targets_from_loaded_module(location)
    assert [target.attribute for target in targets] == ["code_location"]
    assert location.defs is location.defs
    assert location.code_location().resolve_assets_def(dg.AssetKey(["sandbox", "contacts"])) is not None


#: What a run process must not pay for before its first step: httpx (with the idna and rich it
#: pulls in) waits for a client to be built, and the store's stack for a step that writes.
NOT_AT_LOAD = ("httpx", "idna", "rich", "pandas", "sqlalchemy", "alembic")


def test_loading_the_code_location_imports_no_http_client_nor_database_stack() -> None:
    """Every run process imports the code location (and builds its definitions) before its first
    step; a fresh interpreter shows what that costs, which this process, having run tests, cannot."""
    probe = (
        "import sys\n"
        "import sync_project.definitions as location\n"
        "location.code_location()\n"
        f"print(sorted(m for m in {NOT_AT_LOAD!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_code_location_freezes_dagsters_heap_before_importing_the_project() -> None:
    """The collector skips what Dagster's import left (see sync_project.definitions): nearly all
    of those objects are frozen once the code location has been imported."""
    probe = (
        "import gc, sys\n"
        "import dagster\n"
        "before = len(gc.get_objects())\n"
        "import sync_project.definitions\n"
        "print(gc.get_freeze_count() >= 0.9 * before, 'sync_project.registry' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "True True"


def test_the_analytics_asset_follows_the_warehouse_tables_by_declarative_automation() -> None:
    from sync_project.definitions import defs
    from sync_project.orchestration.factory import AUTOMATION_SENSOR
    from sync_project.warehouse.assets import warehouse_key

    contacts, deals = (warehouse_key(registry.get_sync(key)) for key in ("sandbox/contacts", "sandbox/deals"))

    summary = dg.AssetKey(["analytics", "deals_per_contact"])
    sensor = defs.resolve_sensor_def(AUTOMATION_SENSOR)
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions_name("sandbox"), ["c1"])
        selection = dg.AssetSelection.assets(summary)

        def evaluate(cursor: Any) -> Any:
            return dg.evaluate_automation_conditions(
                defs=defs, instance=instance, asset_selection=selection, cursor=cursor
            )

        # The sensor's first tick only records where things stand (eager never fires for state
        # it did not see change).
        result = evaluate(None)
        assert result.total_requested == 0
        for key in (contacts, deals):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key, partition="c1"))
        result = evaluate(result.cursor)
        assert result.get_requested_partitions(summary) == {None}
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=summary))
        result = evaluate(result.cursor)
        assert result.total_requested == 0  # nothing new upstream: nothing to recompute
        # A load of one connection's contacts (after a webhook run): the summary follows.
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=contacts, partition="c1"))
        result = evaluate(result.cursor)
        assert result.get_requested_partitions(summary) == {None}


def test_dg_checks_the_code_location(tmp_path: Path) -> None:
    """``dg check defs`` (dagster-dg-cli, pinned with the family) loads the project that
    pyproject.toml's ``[tool.dg]`` describes, as ``dg list defs`` does."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VIRTUAL_ENV": str(bin_dir.parent), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "DAGSTER_HOME": str(tmp_path)}  # fmt: skip
    project = Path(registry.__file__).resolve().parent.parent
    checked = subprocess.run(
        [str(bin_dir / "dg"), "check", "defs"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr


def test_each_provider_with_webhooks_has_a_standby_drainer_kept_by_a_running_sensor() -> None:
    from sync_project.definitions import defs
    from sync_project.orchestration.standby_job import standby_job_name

    for provider in {s.provider for s in registry.syncs() if s.on_webhook is not None}:
        job = defs.resolve_job_def(standby_job_name(provider))
        assert [node.name for node in job.nodes] == [f"{provider}__standby"]
    standby = defs.resolve_sensor_def("standby_sensor")
    assert standby.default_status == dg.DefaultSensorStatus.RUNNING
