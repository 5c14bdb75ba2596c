"""Launching and inspecting a partition's runs from outside the code location: the control API's
Dagster side.

A triggered poll is a run submitted to the instance's run coordinator, exactly as the daemon
submits a schedule's run request: the same job, partition, run config and tags
(:func:`~sync_project.orchestration.schedules.poll_run`), so the queue's one-poll-per-partition
limit and the poll's maximum run time apply to it as to a scheduled poll, and the daemon launches
it through the code location of the workspace (its origin names that location, as the
webserver's launches do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from sync_project import settings
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.assets import job_name
from sync_project.orchestration.partitions import concurrency_tag, partitions_name
from sync_project.orchestration.run_limits import RunLimits
from sync_project.orchestration.schedules import PollMode, poll_run

#: Where the deployment's workspace file is (default: the project's workspace.yaml).
WORKSPACE_ENV = "SYNC_DAGSTER_WORKSPACE"
#: The module whose ``defs`` the workspace loads (what a run process imports).
DEFINITIONS_MODULE = "sync_project.definitions"
#: Runs that may hold, or are about to hold, a partition's poll lease.
UNFINISHED = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class PartitionBusyError(Exception):
    """A poll of the partition is queued or running."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


@dataclass
class RunLauncher:
    """Submits poll runs of the project's jobs to a Dagster instance (``DAGSTER_HOME``'s by default)."""

    instance: dg.DagsterInstance
    defs: dg.Definitions
    location_name: str
    workspace_file: Path
    run_limits: RunLimits | None = None

    @classmethod
    def from_environment(cls, defs: dg.Definitions | None = None) -> RunLauncher:
        """The instance of ``DAGSTER_HOME`` (default: the project's ``.dagster_home``) and the code
        location the workspace file names for :data:`DEFINITIONS_MODULE`."""
        os.environ.setdefault("DAGSTER_HOME", str(settings.dagster_home()))
        settings.dagster_home()  # makes sure dagster.yaml is there
        if defs is None:
            from sync_project.definitions import defs as project_defs

            defs = project_defs
        workspace = Path(os.environ.get(WORKSPACE_ENV) or settings.project_root() / "workspace.yaml")
        return cls(dg.DagsterInstance.get(), defs, _location_name(workspace), workspace)

    def close(self) -> None:
        self.instance.dispose()

    def unfinished_poll(self, sync: SyncDefinition, connection_id: str) -> dg.DagsterRun | None:
        """A queued or running poll of the partition that went through the queue (schedules,
        triggers); runs launched around it (the UI, backfills) show as the store's lease."""
        records = self.instance.get_run_records(
            filters=dg.RunsFilter(statuses=UNFINISHED, tags=concurrency_tag(sync.key, connection_id, "poll")),
            limit=1,
        )
        return records[0].dagster_run if records else None

    def submit_poll(self, sync: SyncDefinition, connection_id: str, mode: PollMode) -> dg.DagsterRun:
        """Queue a poll of the partition of ``connection_id`` (a connection of the store: the caller
        looked it up), or raise :class:`PartitionBusyError` if one is queued or running already."""
        name = partitions_name(sync.provider)
        if not self.instance.has_dynamic_partition(name, connection_id):
            # Derived from the connection, which exists: connection_partitions_sensor would add
            # it at its next tick; the run needs it now.
            self.instance.add_dynamic_partitions(name, [connection_id])
        queued = self.unfinished_poll(sync, connection_id)
        if queued is not None:
            raise PartitionBusyError(
                f"run {queued.run_id} ({queued.status.value.lower()}) already polls {sync.key} for {connection_id!r}",
                run_id=queued.run_id,
            )
        run_config, tags = poll_run(sync, connection_id, mode, self.run_limits)
        job = self.defs.resolve_job_def(job_name(sync))
        run = self.instance.create_run_for_job(
            job,
            run_config=run_config.to_config_dict(),
            tags={**tags, "dagster/partition": connection_id, "sync/triggered_by": "control_api"},
            status=dg.DagsterRunStatus.NOT_STARTED,
            remote_job_origin=self._remote_origin(job.name),
            job_code_origin=self._python_origin(job.name),
        )
        return self.instance.submit_run(run.run_id, workspace=None)  # type: ignore[arg-type]

    def _remote_origin(self, job: str) -> Any:
        from dagster._core.definitions.repository_definition.valid_definitions import SINGLETON_REPOSITORY_NAME
        from dagster._core.remote_origin import RemoteJobOrigin, RemoteRepositoryOrigin

        location = next(
            origin for origin in _location_origins(self.workspace_file) if origin.location_name == self.location_name
        )
        return RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job)

    def _python_origin(self, job: str) -> Any:
        from dagster._core.definitions.reconstruct import ReconstructableRepository

        repository = ReconstructableRepository.for_module(
            DEFINITIONS_MODULE, "defs", working_directory=str(self.workspace_file.parent)
        )
        return repository.get_reconstructable_job(job).get_python_origin()


def _location_origins(workspace: Path) -> list[Any]:
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    return list(location_origins_from_yaml_paths([str(workspace)]))


def _location_name(workspace: Path) -> str:
    """The code location of the workspace that loads :data:`DEFINITIONS_MODULE`."""
    origins = _location_origins(workspace)
    for origin in origins:
        target = getattr(origin, "loadable_target_origin", None)
        if target is not None and getattr(target, "module_name", None) == DEFINITIONS_MODULE:
            return str(origin.location_name)
    if len(origins) == 1:
        return str(origins[0].location_name)
    raise ValueError(f"{workspace}: no code location loads {DEFINITIONS_MODULE}")


__all__ = ["PartitionBusyError", "RunLauncher"]
