"""The real-time path wired for tests: the sandbox CRM and the receiver served on loopback, the
inbox sensor evaluated against a real Dagster instance, and the runs it requests executed in-process
the way the daemon would launch them (a run key Dagster has seen is never launched twice).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import dagster as dg

from sync_project import registry
from sync_project.core.standard_webhooks import generate_secret
from sync_project.core.sync import SyncDefinition
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.receiver.app import create_app
from sync_project.sandbox.chaos import ChaosSettings
from sync_project.sandbox.client import SandboxAdmin
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.server import SandboxServer
from sync_project.sandbox.service import SandboxConfig
from sync_project.sandbox.webhooks import RetryPolicy
from sync_project.serving import BackgroundServer
from sync_project.store import Store

SECRET_ENV = "SYNC_SANDBOX_WEBHOOK_SECRET"


def sandbox_syncs() -> list[SyncDefinition]:
    return [s for s in registry.syncs() if s.provider == "sandbox"]


class RealtimeHarness:
    def __init__(
        self,
        store: Store,
        instance: dg.DagsterInstance,
        *,
        chaos: ChaosSettings | None = None,
        syncs: Sequence[SyncDefinition] | None = None,
        stall_after_s: float = 120.0,
        seed: int = 7,
    ) -> None:
        self.store = store
        self.instance = instance
        self.syncs = list(syncs or sandbox_syncs())
        os.environ[SECRET_ENV] = secret = generate_secret()
        self.receiver = BackgroundServer(create_app(store, providers=registry.providers(), syncs=self.syncs)).start()
        self.sandbox = SandboxServer(
            SandboxConfig(
                seed=seed,
                webhook_url=f"{self.receiver.url}/webhooks/sandbox",
                webhook_secret=secret,
                rate_limit=RateLimitSettings(enabled=False),
                chaos=chaos or ChaosSettings(),
                retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.5, timeout_s=5.0),
            )
        )
        self.sandbox_url = self.sandbox.start()
        self.admin = SandboxAdmin(self.sandbox_url, self.sandbox.admin_token)
        self.defs = build_definitions(
            self.syncs,
            registry.providers(),
            store=StoreResource(database_url=store.url),
            inbox_stall_after_s=stall_after_s,
            webhook_linger_s=0.0,
        )
        self.sensor = self.defs.resolve_sensor_def("inbox_sensor")
        self.cursor: str | None = None
        self.results: list[dg.ExecuteInProcessResult] = []

    def close(self) -> None:
        self.admin.close()
        self.sandbox.stop()
        self.receiver.stop()
        os.environ.pop(SECRET_ENV, None)

    def connect(self, connection_id: str, account_id: str) -> None:
        """A sandbox account with no data yet, registered as a connection and a partition."""
        token_env = f"TEST_SANDBOX_TOKEN_{connection_id.upper().replace('-', '_')}"
        _, os.environ[token_env] = self.admin.create_account(account_id)
        self.store.connections.add(
            "sandbox",
            connection_id,
            account_id=account_id,
            credentials_env=token_env,
            config={"base_url": self.sandbox_url},
        )
        self.instance.add_dynamic_partitions(partitions_name("sandbox"), [connection_id])

    def tick(self) -> list[dg.RunRequest]:
        # Entered: the store resource is set up for the tick and closed after it.
        with dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            cursor=self.cursor,
            definitions=self.defs,
            resources={"sync_store": StoreResource(database_url=self.store.url)},
        ) as context:
            data = self.sensor.evaluate_tick(context)
            self.cursor = data.cursor if data.cursor is not None else context.cursor
        for request in data.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(data.run_requests or [])

    def launch(self, requests: Sequence[dg.RunRequest]) -> list[dg.ExecuteInProcessResult]:
        """Execute the requests whose run key no run has carried yet, as the daemon would."""
        launched = []
        for request in requests:
            seen = self.instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": request.run_key}), limit=1)
            if seen:
                continue
            job = self.defs.resolve_job_def(request.job_name)
            result = job.execute_in_process(
                instance=self.instance,
                partition_key=request.partition_key,
                run_config=request.run_config,
                tags={**request.tags, "dagster/run_key": request.run_key, "dagster/sensor_name": "inbox_sensor"},
                raise_on_error=False,
            )
            launched.append(result)
        self.results.extend(launched)
        return launched

    def step(self) -> list[dg.ExecuteInProcessResult]:
        return self.launch(self.tick())

    def drain_until_quiet(self, max_rounds: int = 20) -> int:
        """Tick and run until a tick launches nothing; returns the runs launched."""
        total = 0
        for _ in range(max_rounds):
            launched = self.step()
            if not launched:
                return total
            total += len(launched)
        raise AssertionError(f"the inbox was still producing runs after {max_rounds} rounds")

    def poll(self, sync_key: str, connection_id: str, mode: str = "full") -> dg.ExecuteInProcessResult:
        sync = next(s for s in self.syncs if s.key == sync_key)
        job = self.defs.resolve_job_def(f"{sync.provider}__{sync.name}_job")
        return job.execute_in_process(
            instance=self.instance,
            partition_key=connection_id,
            run_config={"ops": {f"{sync.provider}__{sync.name}": {"config": {"mode": mode}}}},
        )


def with_handler(sync: SyncDefinition, handler) -> SyncDefinition:  # noqa: ANN001 - a WebhookFn
    return replace(sync, on_webhook=handler)


def stored_state(store: Store, sync_key: str, connection_id: str) -> tuple[dict[str, dict], set[str]]:
    """(live records by id, ids of tombstones) as the change feed shows them."""
    live: dict[str, dict] = {}
    deleted: set[str] = set()
    cursor = None
    while True:
        page = store.changes(sync_key, connection_id, cursor=cursor, limit=1000)
        for change in page.records:
            if change.deleted_at is None:
                live[change.id] = change.data
                deleted.discard(change.id)
            else:
                deleted.add(change.id)
                live.pop(change.id, None)
        cursor = page.next_cursor
        if not page.has_more:
            return live, deleted
