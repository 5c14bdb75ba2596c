"""A full refresh is a window that survives its runs: a provider failure at page k and a run
SIGKILLed mid-window each leave it open; the next full run resumes at the page after the last one
committed, and delete detection, once the last page is in, covers the whole window: it tombstones
exactly the records that had vanished, and nothing while the window is open. On both backends,
against a paginated API on loopback, with the killed run in a child process (``run_partition``,
as a Dagster run executes it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator

import pytest

from sync_project.core.http import ProviderError
from sync_project.orchestration.partition_run import RunSettings, run_partition
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.orchestration import partition_worker
from sync_project_tests.orchestration.fake_api import ITEMS, PAGE_SIZE, PROVIDER, FakeApi

SPAWN = multiprocessing.get_context("spawn")
CONNECTION = "acme"
ITEM_COUNT = 60  # six pages
LOG = logging.getLogger(__name__)


@pytest.fixture
def api() -> Iterator[tuple[FakeApi, str]]:
    fake = FakeApi()
    for n in range(ITEM_COUNT):
        fake.put(f"item-{n:03d}", name=f"Item {n}")
    with BackgroundServer(fake.app()) as server:
        yield fake, server.url


def live_ids(store: Store) -> set[str]:
    frame = store.dataframe(ITEMS.key, CONNECTION)
    return set(frame["id"])


def full_run(store: Store, run_id: str):
    connection = store.connections.get(ITEMS.provider, CONNECTION)
    return run_partition(
        store,
        ITEMS,
        PROVIDER,
        connection,
        mode="full",
        run_id=run_id,
        log=LOG,
        settings=RunSettings(lease_ttl_s=2.0, poll_lease_wait_s=30),
    )


def test_a_full_refresh_failed_then_killed_resumes_and_tombstones_exactly_the_vanished(
    store: Store, api: tuple[FakeApi, str]
) -> None:
    fake, url = api
    store.connections.add("fakeapi", CONNECTION, config={"base_url": url})
    assert full_run(store, "run-0").polled.window_completed
    assert live_ids(store) == set(fake.items)

    # Deletes nobody announced: one on the first page, one on the last.
    fake.remove("item-003")
    fake.remove("item-057")

    # Run 1: the provider fails at page 3; pages 1-2 are in, the window stays open.
    fake.fail_after_pages = fake.pages_served + 2
    with pytest.raises(ProviderError, match="HTTP 500"):
        full_run(store, "run-1")
    fake.fail_after_pages = None
    window = store.state.get(ITEMS.key, CONNECTION).full_window
    assert window is not None and (window.window_id, window.pages, window.runs) == ("run-1", 2, 1)
    assert "item-003" in live_ids(store) and "item-057" in live_ids(store)  # nothing deleted yet

    # Run 2: killed for real (SIGKILL) once it committed a page of its own.
    fake.on_page = lambda _page: time.sleep(0.25)  # the child is mostly waiting on the provider
    results = SPAWN.Queue()
    child = SPAWN.Process(target=partition_worker.full_refresh, args=(store.url, CONNECTION, "run-2", 2.0, results))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while (window := store.state.get(ITEMS.key, CONNECTION).full_window).pages < 3:
            assert time.monotonic() < deadline, "the second run never committed a page"
            assert child.is_alive(), f"the second run ended early: {results.get(timeout=1)}"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
    fake.on_page = None
    killed_at = store.state.get(ITEMS.key, CONNECTION).full_window
    assert killed_at.window_id == "run-1" and killed_at.runs == 2 and 3 <= killed_at.pages < 6
    assert {"item-003", "item-057"} <= live_ids(store)

    # Run 3 waits out the dead run's lease, resumes after the last committed page, completes.
    ran = full_run(store, "run-3")
    polled = ran.polled
    assert polled.window_completed and polled.window.window_id == "run-1"
    assert polled.pages == 6 - killed_at.pages  # resumed, not restarted at page 1
    assert (polled.window.pages, polled.window.runs) == (6, 3)
    assert polled.deleted_unseen == 2
    assert live_ids(store) == set(fake.items)  # exactly the two vanished ones are tombstoned
    for gone in ("item-003", "item-057"):
        change = store.get(ITEMS.key, CONNECTION, gone)
        assert change.last_action == "deleted" and change.data["id"] == gone
    state = store.state.get(ITEMS.key, CONNECTION)
    assert state.full_window is None and state.last_full_refresh_at is not None
    # The incremental checkpoint is the completed refresh's last one; the next poll reads after it.
    assert state.checkpoint == {"updated_after": max(i["updated_at"] for i in fake.items.values())}
    assert ITEM_COUNT - 2 == store.count(ITEMS.key, CONNECTION) and PAGE_SIZE == 10


def test_an_incremental_poll_during_an_open_window_keeps_its_own_checkpoint(store: Store, api) -> None:
    fake, url = api
    store.connections.add("fakeapi", CONNECTION, config={"base_url": url})
    connection = store.connections.get(ITEMS.provider, CONNECTION)
    run_partition(store, ITEMS, PROVIDER, connection, mode="incremental", run_id="poll-1", log=LOG)
    checkpoint = store.state.get(ITEMS.key, CONNECTION).checkpoint
    fake.remove("item-010")
    fake.fail_after_pages = fake.pages_served + 1
    with pytest.raises(ProviderError):
        full_run(store, "full-1")
    fake.fail_after_pages = None
    fake.put("item-100", name="new")
    polled = run_partition(store, ITEMS, PROVIDER, connection, mode="incremental", run_id="poll-2", log=LOG).polled
    assert (polled.merge.added, polled.pages) == (1, 1)  # from its own checkpoint, not the window's
    assert store.state.get(ITEMS.key, CONNECTION).checkpoint != checkpoint
    assert store.state.get(ITEMS.key, CONNECTION).full_window.pages == 1
    done = full_run(store, "full-2").polled
    assert done.window_completed and done.deleted_unseen == 1 and done.window.runs == 2
    assert store.get(ITEMS.key, CONNECTION, "item-010").last_action == "deleted"
    assert store.get(ITEMS.key, CONNECTION, "item-100").deleted_at is None
