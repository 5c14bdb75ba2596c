"""How long a run may take before Dagster's run monitoring fails it: the ``dagster/max_runtime`` tag.

The default run launcher cannot check whether a run's worker is alive (it does not implement
``check_run_worker_health``), so a run whose worker and code server died together stays STARTED
until its maximum run time is up; the monitoring daemon then fails it. That time is the bound on
how long a dead run keeps its partition's next runs queued, so it is set per kind of run, as
short as a healthy run of that kind allows. Runs without the tag (launches from the UI, backfills,
``dagster asset materialize``, the checks job) get ``run_monitoring.max_runtime_seconds`` from
dagster.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sync_project.core.sync import SyncDefinition

MAX_RUNTIME_TAG = "dagster/max_runtime"


@dataclass(frozen=True)
class RunLimits:
    """Time limits of the runs the inbox sensor and the polling schedules request."""

    #: A webhook run stops claiming after this long even while events keep coming
    #: (``SyncRunConfig.max_linger_run_s``, which the inbox sensor sets from it). A standing
    #: drainer under steady traffic is one run per partition per this long: six an hour.
    webhook_linger_cap: timedelta = timedelta(minutes=10)
    #: What a webhook run may need beyond its linger cap and its handoff wait: waiting out a dead
    #: drainer's lease (its TTL, 30 s, plus 5 s), start-up, its last batch, the checks and the
    #: notification (10 s budget).
    webhook_margin: timedelta = timedelta(seconds=75)
    #: The inbox sensor requests a drainer's successor this long before the drainer's cap: room
    #: for a sensor tick, the run queue and a run process's start on a busy machine.
    handoff_lead: timedelta = timedelta(seconds=45)
    #: A poll may run for two poll intervals, and never less than this: the 10 minutes it may wait
    #: for the partition's poll lease (``poll_lease_wait_s``) and as long again to poll. Ending a
    #: slow poll costs nothing: every page committed its checkpoint, and the next poll resumes there.
    poll_floor: timedelta = timedelta(minutes=20)
    #: A full refresh requested by a poll tick may run this long (or two poll intervals if
    #: longer). One that is stopped loses nothing: its window stays open, every page
    #: checkpointed, and the next tick's full run resumes it.
    full_refresh_floor: timedelta = timedelta(hours=2)
    #: A provider's standby drainer ends after this long (None: ``webhook_linger_cap``); its
    #: successor is requested ``handoff_lead`` before.
    standby_cap: timedelta | None = None

    def __post_init__(self) -> None:
        if self.webhook_linger_cap <= timedelta(0) or self.webhook_margin <= timedelta(0):
            raise ValueError("webhook_linger_cap and webhook_margin must be positive")
        if not timedelta(0) < self.handoff_lead < self.webhook_linger_cap:
            raise ValueError("handoff_lead must be positive and shorter than webhook_linger_cap")
        if self.poll_floor <= timedelta(0) or self.full_refresh_floor <= timedelta(0):
            raise ValueError("poll_floor and full_refresh_floor must be positive")
        if self.standby_cap is not None and not self.handoff_lead < self.standby_cap:
            raise ValueError("standby_cap must be longer than handoff_lead")

    @property
    def standby_run_cap(self) -> timedelta:
        return self.standby_cap or self.webhook_linger_cap

    @property
    def handoff_wait(self) -> timedelta:
        """How long a successor waits for its predecessor's release: the lead, then the
        predecessor's last batch and a dead predecessor's lease expiry (TTL 30 s) with room."""
        return self.handoff_lead + timedelta(seconds=60)

    @property
    def webhook_max_runtime(self) -> timedelta:
        return self.handoff_wait + self.webhook_linger_cap + self.webhook_margin

    def poll_max_runtime(self, sync: SyncDefinition) -> timedelta:
        return max(self.poll_floor, 2 * sync.poll_interval)

    def full_refresh_tags(self, sync: SyncDefinition) -> dict[str, str]:
        return {MAX_RUNTIME_TAG: _seconds(max(self.full_refresh_floor, 2 * sync.poll_interval))}

    def webhook_tags(self) -> dict[str, str]:
        return {MAX_RUNTIME_TAG: _seconds(self.webhook_max_runtime)}

    def poll_tags(self, sync: SyncDefinition) -> dict[str, str]:
        return {MAX_RUNTIME_TAG: _seconds(self.poll_max_runtime(sync))}


def _seconds(value: timedelta) -> str:
    # Dagster reads the tag with float(); whole seconds read best in the UI.
    return str(int(value.total_seconds()))
