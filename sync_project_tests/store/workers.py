"""Code that runs in child processes (spawned, so it must be importable) for the concurrency tests."""

from __future__ import annotations

import time
from multiprocessing.synchronize import Barrier, Event
from typing import Any

from sync_project.store import LeaseLostError, Store

from .helpers import NEWEST, contact

SYNC = "crm/contacts"


def write_batches(
    url: str, connection_id: str, label: str, batches: int, hold_s: float, start: Event, results: Any
) -> None:
    """Write ``batches`` batches, each holding its transaction open for ``hold_s``, and report
    when each one held the batch lock (monotonic clock, shared by every process on the host)."""
    with Store(url) as store:
        start.wait(30)
        intervals = []
        for number in range(batches):
            with store.writer(SYNC, connection_id, NEWEST) as writer:
                began = time.monotonic()
                writer.save([contact(f"{label}-{number}", 1), contact("shared", 10 * number + len(label))])
                time.sleep(hold_s)
                ended = time.monotonic()
            intervals.append((began, ended))
        results.put((label, intervals))


def meet_inside_writer(url: str, connection_id: str, barrier: Barrier, results: Any) -> None:
    """Enter the writer of ``connection_id`` and wait there for the other process to do the same:
    the barrier only opens if both hold their batch locks at once."""
    with Store(url) as store, store.writer(SYNC, connection_id, NEWEST) as writer:
        writer.save([contact(f"{connection_id}-row", 1)])
        try:
            barrier.wait(30)
            results.put((connection_id, "met"))
        except Exception as error:  # noqa: BLE001 - BrokenBarrierError/timeout, reported to the test
            results.put((connection_id, f"alone: {type(error).__name__}"))


def hold_lease(url: str, connection_id: str, ttl_s: float, acquired: Event, release: Event, results: Any) -> None:
    """Hold the poll lease (renewed on its thread) until ``release``, then write once under it and
    report what the fence said: a frozen holder learns only at its next write that it lost."""
    with (
        Store(url) as store,
        store.leases.hold(SYNC, connection_id, "poll", f"child-{connection_id}", ttl_s=ttl_s) as keeper,
    ):
        results.put(("granted", keeper.lease.token))
        acquired.set()
        release.wait(60)
        try:
            with store.writer(SYNC, connection_id, NEWEST, lease=keeper.lease) as writer:
                writer.save([contact("from-child", 1)])
            results.put(("wrote", ""))
        except LeaseLostError as error:
            results.put(("lost", str(error)))


def open_store(url: str, start: Event, results: Any) -> None:
    """Open (and so migrate) the store at the same moment as other processes."""
    start.wait(30)
    try:
        with Store(url) as store:
            results.put(("ok", store.count("any/sync")))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(error)))
