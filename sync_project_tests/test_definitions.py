"""The project's code location loads, and every declared sync becomes an asset, a job and a poller."""

from __future__ import annotations

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
