"""The receiver's database side: one group commit = route + insert in one transaction.

Routing reads a snapshot of the connections table kept between batches (:class:`RoutingCache`),
not a query per batch: the table changes rarely and routing every batch re-read it (18 % of the
commit thread). The snapshot is re-read when the table has changed, told by the table's revision
(a counter every write of a connection moves in its own transaction; host clocks play no part),
read at most every ``check_interval_s`` (0.5 s), and at once when an account the snapshot does not
know has a connection now (one added a moment ago routes its first event; accounts with no
connection cost that one lookup per batch, as every batch once did). A connection removed, paused
or re-pointed is seen within the interval. And whatever the revision says, the snapshot is re-read
once it is ``max_age_s`` (30 s) old: an edit made outside the store (SQL by hand) does not move it.
The revision is always read before the snapshot it stands for, so a write committed between the
two makes the next check re-read, never a change missed.

Each of the group committer's worker threads keeps ONE database connection for its whole life
instead of checking one out of the pool per batch: a checkout costs a ping, and every round trip
is paid twice under load, because a thread coming back from the database must wait for the busy
event-loop thread to hand over the GIL.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from sync_project.core.provider import InboundEvent, MalformedWebhookError
from sync_project.receiver.routing import SubscribersFn, account_of, route
from sync_project.store import (
    Connections,
    ConnectionSnapshot,
    ReceiveResult,
    Store,
    StoreUnavailableError,
    unavailable_as_store_error,
)

#: Postgres's SQLSTATE for a transaction rolled back to break a deadlock.
DEADLOCK_DETECTED = "40P01"
#: Times one batch is run again after being a deadlock's victim (each deadlock costs the server's
#: ``deadlock_timeout``, 1 s by default, so a few are already a slow answer).
DEADLOCK_RETRIES = 3


class RoutingCache:
    """The connections snapshot shared by the writer threads; see the module docstring."""

    def __init__(self, connections: Connections, check_interval_s: float = 0.5, max_age_s: float = 30.0) -> None:
        self._connections = connections
        self._check_interval_s = check_interval_s
        self._max_age_s = max_age_s
        self._loaded_at = 0.0
        self._lock = threading.Lock()
        self._snapshot: ConnectionSnapshot | None = None
        self._version: int | None = None
        self._checked_at = 0.0
        #: Full re-reads of the table (a test and the benchmark look at it).
        self.loads = 0

    def snapshot(self, conn: Connection, wanted: Iterable[tuple[str, Any]]) -> ConnectionSnapshot:
        """A snapshot that routes every (provider, account) in ``wanted`` as the table does now."""
        with self._lock:
            now = time.monotonic()
            snapshot = self._snapshot
            if snapshot is None or now - self._checked_at >= self._check_interval_s:
                version = self._connections.version(conn)
                if snapshot is None or version != self._version or now - self._loaded_at >= self._max_age_s:
                    snapshot = self._load(conn)
                self._version, self._checked_at = version, now
            unknown = [
                (provider, account)
                for provider, account in wanted
                if isinstance(account, str) and not snapshot.knows(provider, account)
            ]
            # An account the snapshot does not know: unroutable, or a connection added since. Only
            # those are looked up (as every batch once was); a hit re-reads the whole table.
            if unknown and self._connections.snapshot(conn, unknown).list():
                version = self._connections.version(conn)
                snapshot = self._load(conn)
                self._version, self._checked_at = version, now
            return snapshot

    def _load(self, conn: Connection) -> ConnectionSnapshot:
        self._snapshot = self._connections.snapshot(conn)
        self._loaded_at = time.monotonic()
        self.loads += 1
        return self._snapshot


@dataclass(frozen=True)
class Delivery:
    """A verified, parsed delivery on its way to the inbox."""

    provider: str
    events: tuple[InboundEvent, ...]
    #: Each event's payload as the inbox stores it (``intake.check_storable`` serialised them).
    payloads_json: tuple[str, ...] | None = None


class InboxWriter:
    """``writer(batch)``: commits a batch of deliveries; one outcome per delivery, in order.

    :meth:`close` closes the connections of idle workers; a worker still inside a commit (stuck
    in a database that does not answer) closes its own when that commit returns. Closing it from
    here would block until then: the driver serialises calls on one connection.
    """

    def __init__(self, store: Store, subscribers: SubscribersFn) -> None:
        self._store = store
        self._subscribers = subscribers
        self.routing = RoutingCache(store.connections)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._idle: set[Connection] = set()
        self._closed = False

    def __call__(self, batch: Sequence[Delivery]) -> list[ReceiveResult | Exception]:
        conn: Connection | None = getattr(self._local, "conn", None)
        with self._lock:
            if self._closed:
                raise StoreUnavailableError("the receiver is shutting down")
            if conn is not None:
                self._idle.discard(conn)
        try:
            return self._commit_retrying(batch)
        finally:
            self._park()

    def close(self) -> None:
        """Close every idle worker's connection (after the committer stopped)."""
        with self._lock:
            self._closed = True
            connections, self._idle = list(self._idle), set()
        for conn in connections:
            _close(conn)

    def _commit_retrying(self, batch: Sequence[Delivery]) -> list[ReceiveResult | Exception]:
        with unavailable_as_store_error():
            reconnected = False
            deadlocks = 0
            while True:
                reused = getattr(self._local, "conn", None) is not None
                try:
                    return self._commit(batch)
                except DBAPIError as error:
                    # Two writers inserting the same event keys in opposite orders (a redelivery
                    # racing its original) deadlock; Postgres rolls one back. Nothing of it was
                    # committed and its connection is fine: run it again rather than answer 503.
                    if _is_deadlock(error) and deadlocks < DEADLOCK_RETRIES:
                        deadlocks += 1
                        continue
                    self._drop()
                    # A kept connection may have died while idle (server restart, idle timeout).
                    # Nothing was committed, so one retry on a fresh connection is safe.
                    if not reconnected and reused and error.connection_invalidated:
                        reconnected = True
                        continue
                    raise
                except Exception:
                    self._drop()
                    raise

    def _park(self) -> None:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            return
        with self._lock:
            if not self._closed:
                self._idle.add(conn)
                return
        self._drop()

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            _close(conn)

    def _commit(self, batch: Sequence[Delivery]) -> list[ReceiveResult | Exception]:
        if getattr(self._local, "conn", None) is None:
            self._local.conn = self._store.connect()
        conn: Connection = self._local.conn
        with conn.begin():
            return self._route_and_insert(conn, batch)

    def _route_and_insert(self, conn: Connection, batch: Sequence[Delivery]) -> list[ReceiveResult | Exception]:
        wanted = {(d.provider, account_of(e)) for d in batch for e in d.events if _routable_account(e)}
        snapshot = self.routing.snapshot(conn, wanted)
        outcomes: list[ReceiveResult | Exception] = []
        routed: list[tuple[int, tuple[str, list]]] = []
        for delivery in batch:
            try:
                rows = route(
                    delivery.provider,
                    delivery.events,
                    snapshot,
                    subscribers=self._subscribers,
                    payloads_json=delivery.payloads_json,
                )
            except MalformedWebhookError as error:
                outcomes.append(error)
                continue
            outcomes.append(ReceiveResult())  # replaced by the insert's counts below
            routed.append((len(outcomes) - 1, (delivery.provider, rows)))
        results = self._store.inbox.insert(conn, [item for _, item in routed])
        for (index, _), result in zip(routed, results, strict=True):
            outcomes[index] = result
        return outcomes


def _is_deadlock(error: DBAPIError) -> bool:
    return getattr(error.orig, "pgcode", None) == DEADLOCK_DETECTED


def _close(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # a dead connection may refuse even to close
        conn.close()


def _routable_account(event: InboundEvent) -> bool:
    # Other types are refused per delivery by route(); they must not break the batch's lookup.
    return event.account_id is None or isinstance(account_of(event), str)
