"""StoreResource's lifecycle: every execution (a run, a sensor or schedule tick, the checks job)
opens its store and closes it when Dagster tears the resource down, so a long-lived process holds
no connection between executions; the schema's revision is checked once per process and URL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import dagster as dg
import pytest
import sqlalchemy as sa

from sync_project.orchestration.checks import CHECKS_JOB
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.notifications import NotifierResource
from sync_project.orchestration.partitions import partitions_name
from sync_project.orchestration.resources import StoreResource
from sync_project.serving import BackgroundServer
from sync_project.store import Store, migrate
from sync_project.store.engine import make_engine
from sync_project_tests.conftest import POSTGRES_URL
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi

#: How long the server may take to end a backend after its client closed the connection.
DISCONNECT_DEADLINE_S = 10.0


class Executions:
    """Runs, sensor ticks, schedule ticks and the checks job of one definitions object."""

    def __init__(self, url: str, instance: dg.DagsterInstance) -> None:
        self.url, self.instance = url, instance
        self.defs = build_definitions(
            [ITEMS], {"fakeapi": PROVIDER}, store=StoreResource(database_url=url), notifier=NotifierResource()
        )

    def resources(self) -> dict[str, StoreResource]:
        return {"sync_store": StoreResource(database_url=self.url)}

    def run(self) -> None:
        result = self.defs.resolve_job_def("fakeapi__items_job").execute_in_process(
            instance=self.instance,
            partition_key="c1",
            run_config={"ops": {"fakeapi__items": {"config": {"mode": "incremental"}}}},
        )
        assert result.success

    def sensor_tick(self) -> dg.SensorExecutionData:
        with dg.build_sensor_context(
            instance=self.instance,
            instance_ref=self.instance.get_ref(),
            definitions=self.defs,
            resources=self.resources(),
        ) as context:
            return self.defs.resolve_sensor_def("inbox_sensor").evaluate_tick(context)

    def schedule_tick(self) -> list[dg.RunRequest]:
        with dg.build_schedule_context(
            instance=self.instance,
            scheduled_execution_time=datetime.now(timezone.utc),
            resources=self.resources(),
            repository_def=self.defs.get_repository_def(),
        ) as context:
            return list(self.defs.resolve_schedule_def("poll_fakeapi__items").evaluate_tick(context).run_requests or [])

    def checks(self) -> None:
        assert self.defs.resolve_job_def(CHECKS_JOB).execute_in_process(instance=self.instance).success


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        test_instance.add_dynamic_partitions(partitions_name("fakeapi"), ["c1"])
        yield test_instance


@pytest.fixture
def api_url() -> Iterator[str]:
    api = FakeApi()
    for n in range(3):
        api.put(f"i{n}", name=str(n))
    with BackgroundServer(api.app()) as server:
        yield server.url


def sessions(admin: sa.Engine, application_name: str) -> int:
    with admin.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                {"name": application_name},
            ).scalar_one()
        )


def test_executions_leave_no_connection_open(postgres_url: str, instance: dg.DagsterInstance, api_url: str) -> None:
    application_name = f"store_resource_{uuid.uuid4().hex[:12]}"
    url = f"{postgres_url}&application_name={application_name}"
    with Store(url) as store:
        store.connections.add("fakeapi", "c1", config={"base_url": api_url})
    executions = Executions(url, instance)
    admin = sa.create_engine(POSTGRES_URL)
    try:
        for _ in range(3):
            executions.run()
            executions.sensor_tick()
            assert [r.partition_key for r in executions.schedule_tick()] == ["c1"]
            executions.checks()
        # Each execution's store was closed at its teardown; the server ends the backends once it
        # sees the disconnects (bounded wait). A store kept open per process would keep its pool.
        deadline = time.monotonic() + DISCONNECT_DEADLINE_S
        while (open_sessions := sessions(admin, application_name)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_sessions == 0
    finally:
        admin.dispose()


def test_the_schema_revision_is_checked_once_per_process_and_url(
    database_url: str, instance: dg.DagsterInstance, api_url: str
) -> None:
    with Store(database_url) as store:
        store.connections.add("fakeapi", "c1", config={"base_url": api_url})
    executions = Executions(database_url, instance)
    executions.sensor_tick()  # the first execution with this URL in this process checks it
    with Store(database_url) as store, store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'not_a_revision'"))
    # The check is real: it now refuses the schema, as a new process's first execution would...
    engine = make_engine(database_url)
    try:
        with pytest.raises(Exception, match="not_a_revision"):
            migrate.upgrade(engine)
    finally:
        engine.dispose()
    # ...but later executions of this process do not check again.
    for _ in range(3):
        executions.sensor_tick()
        assert [r.partition_key for r in executions.schedule_tick()] == ["c1"]
    executions.run()
