"""Fenced leases (DESIGN, "Ownership and faults"), each on SQLite and Postgres.

A lease is granted to one holder at a time, its token grows with every grant, a holder that lost
it writes nothing more (every fenced transaction proves its token current), and a dead holder's
lease expires so the next run takes over. Across processes too: a holder frozen with SIGSTOP past
its expiry learns at its next write, not before, that it lost.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from sync_project.store import LeaseHeldError, LeaseLostError, Store
from sync_project.store.inbox import RoutedEvent
from sync_project.store.leases import LeaseKeeper, database_now
from sync_project.store.schema import leases

from . import workers
from .helpers import NEWEST, contact, snapshot

SPAWN = multiprocessing.get_context("spawn")
SYNC = workers.SYNC


def expire(store: Store, connection_id: str = "acme", role: str = "poll") -> None:
    """Move a lease's expiry into the past, as the passing of its TTL would (database time)."""
    with store.engine.begin() as conn:
        past = database_now(conn) - timedelta(seconds=1)
        conn.execute(
            sa.update(leases)
            .where(leases.c.sync == SYNC, leases.c.connection_id == connection_id, leases.c.role == role)
            .values(expires_at=past)
        )


def test_a_live_lease_is_refused_to_everyone_and_tokens_grow(store: Store) -> None:
    first = store.leases.acquire(SYNC, "acme", "poll", "run-1")
    with pytest.raises(LeaseHeldError, match=r"another run \(run-1\) holds the poll lease of crm/contacts") as held:
        store.leases.acquire(SYNC, "acme", "poll", "run-2")
    assert held.value.holder == "run-1" and held.value.expires_at == first.expires_at
    with pytest.raises(LeaseHeldError):
        store.leases.acquire(SYNC, "acme", "poll", "run-1")  # not re-entrant: a second copy of a run

    # Other roles and other connections are other leases.
    drain = store.leases.acquire(SYNC, "acme", "drain", "run-3")
    other = store.leases.acquire(SYNC, "globex", "poll", "run-2")
    assert (drain.token, other.token) == (1, 1)

    assert store.leases.release(first)
    second = store.leases.acquire(SYNC, "acme", "poll", "run-2")
    assert second.token == first.token + 1
    expire(store)
    third = store.leases.acquire(SYNC, "acme", "poll", "run-4")
    assert third.token == second.token + 1
    assert [(s.role, s.holder, s.token) for s in store.leases.list(SYNC) if s.connection_id == "acme"] == [
        ("drain", "run-3", 1),
        ("poll", "run-4", 3),
    ]


def test_a_holder_that_lost_its_lease_writes_nothing(store: Store) -> None:
    old = store.leases.acquire(SYNC, "acme", "poll", "run-old")
    with store.writer(SYNC, "acme", NEWEST, lease=old) as writer:
        writer.save([contact("a", 1)])
    expire(store)
    new = store.leases.acquire(SYNC, "acme", "poll", "run-new")
    before = snapshot(store)

    attempts = {
        "save": lambda w: w.save([contact("a", 2), contact("b", 1)]),
        "checkpoint": lambda w: w.set_checkpoint({"cursor": "stale"}),
        "delete detection": lambda w: w.delete_unseen("run-old", store.leases.list()[0].granted_at),
    }
    for name, attempt in attempts.items():
        with pytest.raises(
            LeaseLostError,
            match=r"the poll lease of crm/contacts for connection 'acme' \(token 1\) was lost: run run-new holds it with token 2",
        ):
            with store.writer(SYNC, "acme", NEWEST, lease=old) as writer:
                attempt(writer)
        assert snapshot(store) == before, f"{name} wrote under a lost lease"

    with store.writer(SYNC, "acme", NEWEST, lease=new) as writer:
        assert writer.save([contact("a", 2)]).updated == 1
    store.leases.release(new)
    with pytest.raises(LeaseLostError, match="it is free"):
        with store.writer(SYNC, "acme", NEWEST, lease=new) as writer:
            writer.save([contact("a", 3)])


def test_an_expired_lease_nobody_took_is_still_current(store: Store) -> None:
    """Fencing is by token: a holder that was slow but not replaced may go on, and may renew."""
    lease = store.leases.acquire(SYNC, "acme", "poll", "run-1")
    expire(store)
    with store.writer(SYNC, "acme", NEWEST, lease=lease) as writer:
        writer.save([contact("a", 1)])
    renewed = store.leases.renew(lease, ttl_s=30)
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    with pytest.raises(LeaseHeldError):
        store.leases.acquire(SYNC, "acme", "poll", "run-2")


def test_failed_inbox_attempts_are_fenced_too(store: Store) -> None:
    event = RoutedEvent(
        event_key="e1",
        event_type="contact.updated",
        account_id="a1",
        payload={"id": "e1"},
        sync=SYNC,
        connection_id="acme",
    )
    store.inbox.receive("crm", [event])
    [pending] = store.inbox.events(status="pending")
    old = store.leases.acquire(SYNC, "acme", "drain", "run-old")
    expire(store, role="drain")
    store.leases.acquire(SYNC, "acme", "drain", "run-new")
    with pytest.raises(LeaseLostError):
        store.inbox.mark_failed(pending.id, "boom", lease=old)
    assert store.inbox.get(pending.id).attempts == 0


def test_the_keeper_renews_and_notices_a_takeover(store: Store) -> None:
    with store.leases.hold(SYNC, "acme", "poll", "run-1", ttl_s=0.6) as keeper:
        granted = keeper.lease
        time.sleep(1.5)  # two and more renewals: without them the lease would have expired
        with pytest.raises(LeaseHeldError):
            store.leases.acquire(SYNC, "acme", "poll", "run-2")
        assert keeper.lease.expires_at > granted.expires_at
    # Released on exit: the next run is granted it at once.
    store.leases.release(store.leases.acquire(SYNC, "acme", "poll", "run-2"))

    lease = store.leases.acquire(SYNC, "acme", "poll", "run-3", ttl_s=0.6)
    keeper = LeaseKeeper(store.leases, lease, ttl_s=0.6)
    expire(store)
    store.leases.acquire(SYNC, "acme", "poll", "run-4")
    keeper.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            keeper.check()
        except LeaseLostError as error:
            assert "run run-4 holds it" in str(error)
            break
        time.sleep(0.05)
    else:
        pytest.fail("the keeper never noticed that run-4 took its lease")
    keeper.stop()
    assert [s.holder for s in store.leases.list(SYNC)] == ["run-4"]  # stop() released nothing of run-4's


def test_a_waiting_run_is_granted_the_lease_when_its_holder_releases_it(store: Store) -> None:
    lease = store.leases.acquire(SYNC, "acme", "poll", "run-1")
    timer = threading.Timer(0.5, store.leases.release, args=(lease,))
    timer.start()
    try:
        waited = store.leases.acquire(SYNC, "acme", "poll", "run-2", wait_s=20)
    finally:
        timer.join()
    assert waited.holder == "run-2" and waited.token == 2
    with pytest.raises(LeaseHeldError):
        store.leases.acquire(SYNC, "acme", "poll", "run-3", wait_s=0.3)


def test_a_grant_waits_for_the_fenced_transaction_in_flight(postgres_url: str) -> None:
    """The fence's row lock: a takeover cannot slip in between an old holder's check and its
    commit. The grant waits for that commit, and the old holder's next transaction is refused."""
    with Store(postgres_url) as store:
        old = store.leases.acquire(SYNC, "acme", "poll", "run-old", ttl_s=30)
        granted: list[int] = []
        with store.writer(SYNC, "acme", NEWEST, lease=old) as writer:
            writer.save([contact("a", 1)])
            # A renewal touches no key column: it does not wait for the write.
            renewer = threading.Thread(target=lambda: store.leases.renew(old, ttl_s=30))
            renewer.start()
            renewer.join(10)
            assert not renewer.is_alive(), "a renewal waited for its own holder's write"
            expire(store)
            taker = threading.Thread(
                target=lambda: granted.append(store.leases.acquire(SYNC, "acme", "poll", "run-new").token)
            )
            taker.start()
            taker.join(1.0)
            assert taker.is_alive() and not granted, "a grant slipped in while a fenced write was open"
        taker.join(10)
        assert granted == [2]
        with pytest.raises(LeaseLostError):
            with store.writer(SYNC, "acme", NEWEST, lease=old) as writer:
                writer.save([contact("a", 2)])
        assert store.get(SYNC, "acme", "a").data["version"] == 1  # type: ignore[union-attr]


# -- across processes --------------------------------------------------------------------------


def test_a_holder_frozen_past_its_expiry_is_fenced_when_it_wakes(database_url: str) -> None:
    Store(database_url).close()
    acquired, release, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=workers.hold_lease, args=(database_url, "acme", 1.0, acquired, release, results))
    holder.start()
    try:
        assert acquired.wait(60), "the child was never granted the lease"
        assert results.get(timeout=10) == ("granted", 1)
        with Store(database_url) as store:
            with pytest.raises(LeaseHeldError, match="child-acme"):
                store.leases.acquire(SYNC, "acme", "poll", "parent")
            os.kill(holder.pid, signal.SIGSTOP)  # a hung host: no renewals, no writes
            try:
                lease = store.leases.acquire(SYNC, "acme", "poll", "parent", wait_s=15)
                assert lease.token == 2
                with store.writer(SYNC, "acme", NEWEST, lease=lease) as writer:
                    writer.save([contact("from-parent", 1)])
            finally:
                os.kill(holder.pid, signal.SIGCONT)
            release.set()
            outcome, message = results.get(timeout=30)
            assert outcome == "lost", message
            assert "token 1) was lost: run parent holds it with token 2" in message
            assert store.get(SYNC, "acme", "from-child") is None
            assert store.get(SYNC, "acme", "from-parent") is not None
    finally:
        release.set()
        holder.join(60)
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == 0


def test_a_killed_holders_lease_expires_and_the_next_run_takes_over(database_url: str) -> None:
    Store(database_url).close()
    acquired, release, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=workers.hold_lease, args=(database_url, "acme", 1.0, acquired, release, results))
    holder.start()
    assert acquired.wait(60)
    holder.kill()  # a crashed run: no finally blocks, no release
    holder.join(60)
    with Store(database_url) as store:
        with pytest.raises(LeaseHeldError):
            store.leases.acquire(SYNC, "acme", "poll", "next")
        lease = store.leases.acquire(SYNC, "acme", "poll", "next", wait_s=15)
        assert (lease.holder, lease.token) == ("next", 2)
