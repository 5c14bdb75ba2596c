"""A polling run in a child process (spawned, so it must be importable), for the fault tests: the
same ``run_partition`` a Dagster run executes, so the parent can freeze, cut and race it for real."""

from __future__ import annotations

import logging
from typing import Any

from sync_project.orchestration.partition_run import RunSettings, run_partition
from sync_project.store import Store
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER


def full_refresh(url: str, connection_id: str, run_id: str, lease_ttl_s: float, results: Any) -> None:
    """Report ("ok", counts) or ("error", exception type, message); never raise (exit code 0)."""
    logging.basicConfig(level=logging.INFO)
    try:
        with Store(url) as store:
            connection = store.connections.get(ITEMS.provider, connection_id)
            ran = run_partition(
                store,
                ITEMS,
                PROVIDER,
                connection,
                mode="full",
                run_id=run_id,
                log=logging.getLogger(run_id),
                settings=RunSettings(lease_ttl_s=lease_ttl_s, poll_lease_wait_s=0),
            )
        results.put(("ok", ran.merge.as_dict()))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(("error", type(error).__name__, str(error)))
