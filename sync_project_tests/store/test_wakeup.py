"""A drainer's wake-up: Postgres NOTIFY from the inbox insert's transaction, on a real server;
SQLite's bounded poll."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from sync_project.store import Store
from sync_project.store.inbox import RoutedEvent, insert_events
from sync_project.store.wakeup import InboxWakeup, notify_inserted


def routed(key: str, connection_id: str = "c1", sync: str = "sandbox/contacts") -> RoutedEvent:
    return RoutedEvent(
        event_key=key,
        event_type="contact.updated",
        account_id="a1",
        payload={"id": key},
        sync=sync,
        connection_id=connection_id,
    )


@pytest.fixture
def pg_store(postgres_url: str):
    with Store(postgres_url) as store:
        yield store


def test_an_insert_wakes_the_partitions_drainer(pg_store: Store) -> None:
    # A long fallback: only the notification can end this wait early.
    with InboxWakeup(pg_store.engine, "sandbox/contacts", "c1", fallback_s=60.0) as wakeup:
        assert wakeup.listening
        timer = threading.Timer(0.3, lambda: pg_store.inbox.receive("sandbox", [routed("e1")]))
        timer.start()
        try:
            assert wakeup.wait(60.0) is True
        finally:
            timer.join()
        assert wakeup.notified == 1


def test_another_partitions_events_or_a_rolled_back_insert_do_not_wake_it(pg_store: Store) -> None:
    with InboxWakeup(pg_store.engine, "sandbox/contacts", "c1", fallback_s=1.0) as wakeup:
        pg_store.inbox.receive("sandbox", [routed("e1", connection_id="c2"), routed("e2", sync="sandbox/deals")])
        with pytest.raises(RuntimeError), pg_store.engine.begin() as conn:
            insert_events(conn, [("sandbox", [routed("e3")])])
            raise RuntimeError("the receiver's commit failed")
        assert wakeup.wait() is False  # the fallback ran out
        assert pg_store.inbox.count(status="pending", sync="sandbox/contacts", connection_id="c1") == 0


def test_a_notification_sent_before_the_wait_is_not_lost(pg_store: Store) -> None:
    # Listening starts before the first claim: an event committed between a claim that found
    # nothing and the wait still ends the wait.
    with InboxWakeup(pg_store.engine, "sandbox/contacts", "c1", fallback_s=60.0) as wakeup:
        pg_store.inbox.receive("sandbox", [routed("e1")])
        assert wakeup.wait(60.0) is True


def test_a_killed_listening_session_falls_back_and_listens_again(pg_store: Store) -> None:
    with InboxWakeup(pg_store.engine, "sandbox/contacts", "c1", fallback_s=1.0) as wakeup:
        with pg_store.engine.begin() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": wakeup.session_pid})
        assert wakeup.wait() is False  # the session is gone: the wait falls back to the poll
        assert not wakeup.listening
        wakeup.open()  # a new session listens
        assert wakeup.listening
        timer = threading.Timer(0.3, lambda: pg_store.inbox.receive("sandbox", [routed("e9")]))
        timer.start()
        try:
            assert wakeup.wait(60.0) is True
        finally:
            timer.join()


def test_sqlite_waits_a_bounded_poll(sqlite_url: str) -> None:
    with Store(sqlite_url) as store, InboxWakeup(store.engine, "sandbox/contacts", "c1", fallback_s=60.0) as wakeup:
        assert not wakeup.listening
        assert wakeup.wait(60.0) is False  # returns after SQLITE_POLL_S, not the fallback
        with store.engine.begin() as conn:
            notify_inserted(conn, [("sandbox/contacts", "c1")])  # a no-op on SQLite
