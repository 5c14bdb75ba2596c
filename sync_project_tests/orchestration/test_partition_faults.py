"""Partition ownership under real faults (issue: "a lost run lock tombstones live data").

A full refresh runs in a child process, exactly as a run executes it (``run_partition``), against a
paginated API served on loopback. Mid-refresh the test cuts it: its database sessions are
terminated (``pg_terminate_backend``) and, where the scenario says so, the process is frozen with
SIGSTOP past its lease's expiry while a second full refresh starts. Under the old session lock the
second refresh started at once and the first one's delete detection then tombstoned what the second
re-saw. With fenced leases: sessions are not ownership, a frozen holder's lease is taken over only
after it expired, and the frozen run, once thawed, fails naming its lost lease having written
nothing more. Zero live records are tombstoned. Directly, through pgbouncer in transaction mode,
and (freezing only: SQLite has no sessions to cut) on SQLite across processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from sync_project.orchestration.partition_run import RunSettings, run_partition
from sync_project.serving import BackgroundServer
from sync_project.store import LeaseHeldError, Store
from sync_project_tests.conftest import IN_CI, POSTGRES_URL
from sync_project_tests.orchestration import partition_worker
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER, FakeApi
from sync_project_tests.support import pgbouncer

SPAWN = multiprocessing.get_context("spawn")
CONNECTION = "acme"
ITEM_COUNT = 60  # six pages
PAGE_DELAY_S = 0.3
TTL_S = 2.0
FIRST = "run-first"


@pytest.fixture(params=["sqlite", "postgres", "pgbouncer"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    if request.param == "pgbouncer":
        problem = pgbouncer.available()
        if problem:
            if IN_CI:
                pytest.fail(problem, pytrace=False)
            pytest.skip(problem)
        with pgbouncer.pgbouncer_database() as url:
            yield "pgbouncer", url
        return
    yield request.param, request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    for n in range(ITEM_COUNT):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    # Every page takes a while, so a refresh is mostly waiting on the provider, as real ones are.
    fake.on_page = lambda _page: time.sleep(PAGE_DELAY_S)
    with BackgroundServer(fake.app()) as server:
        yield fake, server.url


def named(url: str, application_name: str) -> str:
    """The URL with an application_name, so the test finds that process's sessions."""
    if url.startswith("sqlite"):
        return url
    return f"{url}{'&' if '?' in url else '?'}application_name={application_name}"


def sessions_and_transactions(kind: str, url: str, application_name: str) -> tuple[int, int]:
    """The named process's database sessions and how many of them are in a transaction right now
    (SQLite: no sessions to count, and whether the write lock is held)."""
    if kind == "sqlite":
        probe = sqlite3.connect(sa.engine.make_url(url).database or "", timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return 0, 0
        except sqlite3.OperationalError:
            return 0, 1
        finally:
            probe.close()
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.connect() as conn:
            sessions, busy = conn.execute(
                sa.text(
                    "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity"
                    " WHERE application_name = :name"
                ),
                {"name": application_name},
            ).one()
            return int(sessions), int(busy)
    finally:
        admin.dispose()


def terminate_sessions(application_name: str) -> int:
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"
                    ),
                    {"name": application_name},
                ).scalar_one()
            )
    finally:
        admin.dispose()


def freeze_while_waiting_on_the_provider(process: Any, kind: str, url: str, fake: FakeApi, store: Store) -> None:
    """SIGSTOP the child while it waits for a page, as a refresh mostly does: it then holds no
    transaction and no connection it is about to use, but keeps its pooled sessions to cut.

    Frozen mid-transaction it would hold its row locks, and frozen between a connection's checkout
    (where the pool pings it) and its first statement, that statement would fail on the cut
    session: other faults, with other outcomes (a run that fails with StoreUnavailableError).
    A refresh fetches the next page while it merges the last one, so waiting on the provider is not
    enough: every page served must also be merged (the window counts them), or the merge may be
    in that gap, which no session's state shows."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if fake.answering_page.wait(timeout=1):
            os.kill(process.pid, signal.SIGSTOP)
            sessions, busy = sessions_and_transactions(kind, url, FIRST)
            if (
                fake.answering_page.is_set()
                and merged_pages(store) == fake.pages_served
                and busy == 0
                and (kind == "sqlite" or sessions >= 1)
            ):
                return
            os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail("the child was never caught waiting on the provider with its sessions idle")


def merged_pages(store: Store) -> int:
    """Pages the refresh has merged and committed: its full window counts them."""
    state = store.state.get(ITEMS.key, CONNECTION)
    window = state.full_window if state is not None else None
    return window.pages if window is not None else 0


def start_first_refresh(kind: str, url: str, fake: FakeApi) -> tuple[Any, Any]:
    results = SPAWN.Queue()
    child = SPAWN.Process(
        target=partition_worker.full_refresh, args=(named(url, FIRST), CONNECTION, FIRST, TTL_S, results)
    )
    child.start()
    deadline = time.monotonic() + 60
    while fake.pages_served < 3:  # mid-refresh: two pages merged, more to come
        assert time.monotonic() < deadline, "the first refresh never reached its third page"
        assert child.is_alive(), f"the first refresh ended early: {results.get(timeout=1)}"
        time.sleep(0.02)
    return child, results


def assert_store_matches_provider(store: Store, fake: FakeApi) -> None:
    assert store.count(ITEMS.key, CONNECTION, include_deleted=True) == ITEM_COUNT
    assert store.count(ITEMS.key, CONNECTION) == ITEM_COUNT, "live records were tombstoned"
    frame = store.dataframe(ITEMS.key, CONNECTION)
    stored = {
        row["id"]: (row["name"], row["updated_at"]) for row in frame[["id", "name", "updated_at"]].to_dict("records")
    }
    assert stored == {key: (item["name"], item["updated_at"]) for key, item in fake.items.items()}


@pytest.fixture
def store_with_connection(backend: tuple[str, str], api: tuple[FakeApi, str]) -> Iterator[Store]:
    _, url = backend
    with Store(url) as store:
        store.connections.add(ITEMS.provider, CONNECTION, account_id="acct-1", config={"base_url": api[1]})
        yield store


def test_a_refresh_frozen_past_its_lease_is_fenced_and_tombstones_nothing(
    backend: tuple[str, str], api: tuple[FakeApi, str], store_with_connection: Store
) -> None:
    kind, url = backend
    fake, _ = api
    store = store_with_connection
    child, results = start_first_refresh(kind, url, fake)
    try:
        freeze_while_waiting_on_the_provider(child, kind, url, fake, store)
        if kind != "sqlite":
            assert terminate_sessions(FIRST) >= 1  # its sessions, and with them any session lock

        second: dict[str, Any] = {}

        def second_refresh() -> None:
            try:
                second["result"] = run_partition(
                    store,
                    ITEMS,
                    PROVIDER,
                    store.connections.get(ITEMS.provider, CONNECTION),
                    mode="full",
                    run_id="run-second",
                    log=_quiet,
                    settings=RunSettings(lease_ttl_s=30, poll_lease_wait_s=30),
                )
            except Exception as error:  # noqa: BLE001 - asserted below
                second["error"] = error

        racer = threading.Thread(target=second_refresh)
        racer.start()
        # The second refresh is granted the lease only once the frozen one's expired.
        deadline = time.monotonic() + 30
        while not any(s.holder == "run-second" for s in store.leases.list(ITEMS.key)):
            assert time.monotonic() < deadline, "the second refresh never got the lease"
            assert racer.is_alive(), f"the second refresh ended without the lease: {second}"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGCONT)  # thawed while the second refresh holds the partition
        outcome = results.get(timeout=60)
        racer.join(60)
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)

    assert outcome[0] == "error" and outcome[1] == "LeaseLostError", outcome
    assert (
        "the poll lease of fakeapi/items for connection 'acme' (token 1) was lost: run run-second holds it with token 2"
        in outcome[2]
    )
    assert "error" not in second, second
    assert second["result"].polled.deleted_unseen == 0
    assert_store_matches_provider(store, fake)


@pytest.mark.parametrize("backend", ["postgres", "pgbouncer"], indirect=True)
def test_terminated_sessions_do_not_end_ownership(
    backend: tuple[str, str], api: tuple[FakeApi, str], store_with_connection: Store
) -> None:
    """Only its sessions are cut: the first refresh still holds its lease (it reconnects and renews),
    so a second one started meanwhile is refused naming it, and the first completes."""
    kind, url = backend
    fake, _ = api
    store = store_with_connection
    child, results = start_first_refresh(kind, url, fake)
    try:
        freeze_while_waiting_on_the_provider(child, kind, url, fake, store)
        try:
            assert terminate_sessions(FIRST) >= 1
        finally:
            os.kill(child.pid, signal.SIGCONT)
        with pytest.raises(LeaseHeldError, match=f"another run \\({FIRST}\\) holds the poll lease of fakeapi/items"):
            run_partition(
                store,
                ITEMS,
                PROVIDER,
                store.connections.get(ITEMS.provider, CONNECTION),
                mode="full",
                run_id="run-second",
                log=_quiet,
                settings=RunSettings(poll_lease_wait_s=0),
            )
        outcome = results.get(timeout=60)
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join(10)
    assert outcome[0] == "ok", outcome
    assert outcome[1]["added"] == ITEM_COUNT and outcome[1]["deleted"] == 0
    assert_store_matches_provider(store, fake)


class _Quiet:
    def info(self, message: str) -> None:
        pass

    warning = error = info


_quiet = _Quiet()
