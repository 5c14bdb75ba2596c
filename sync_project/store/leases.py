"""Who may write a (sync, connection): a fenced lease held in the store.

A lease is a row: its holder (a run id), a fencing token that grows with every grant, and an expiry
the holder renews while it works. Ownership is therefore a fact in the database, not a property of
a session: poolers in transaction mode, idle timeouts, network cuts and ``pg_terminate_backend`` end
sessions silently, and a lock tied to one would vanish with it while its holder kept writing.

The fence: every transaction that writes the partition on behalf of a lease (merges, checkpoints,
inbox acknowledgements, delete detection) calls :func:`check_lease` first. It reads the lease row
under ``FOR KEY SHARE``, so a grant (``FOR UPDATE``) waits until that transaction ends, and it
refuses unless the token is still the one granted. A holder whose lease expired and was granted to
another run therefore writes nothing more: its next transaction raises :class:`LeaseLostError`,
whatever it believes. An expired lease nobody took over is still current: its holder may go on,
since nobody else can have written under it.

Expiry is database time on Postgres (``clock_timestamp()``): runs on several hosts would otherwise
compare their own clocks. SQLite is one host, so its clock is the process's.

Each (sync, connection) has two roles, ``poll`` (schedules, backfills, launches from the UI) and
``drain`` (webhook runs), so a full refresh and the webhook drain proceed side by side; their writes
are serialised one transaction at a time by the batch lock (:mod:`sync_project.store.locks`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.errors import LeaseHeldError, LeaseLostError, StoreError
from sync_project.store.schema import leases

LeaseRole = Literal["poll", "drain", "standby"]
#: ``standby`` is not a partition's: a provider's standby drainer holds one per run slot
#: (sync = the provider, connection_id = ``standby.<slot>``), which shows the sensor it is alive.
ROLES: tuple[LeaseRole, ...] = ("poll", "drain", "standby")

#: A lease outlives a missed renewal or two (renewals run every third of it), and a dead holder's
#: partition is free again within this long.
DEFAULT_TTL_S = 30.0
#: How often a waiting run asks again for a lease that another run holds.
WAIT_POLL_S = 0.5

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A grant: the right to write (sync, connection) in ``role`` while ``token`` is current."""

    sync: str
    connection_id: str
    role: LeaseRole
    holder: str
    token: int
    expires_at: datetime

    def describe(self) -> str:
        return f"the {self.role} lease of {self.sync} for connection {self.connection_id!r} (token {self.token})"


@dataclass(frozen=True)
class LeaseState:
    """A lease row as an operator sees it (``holder`` None: free)."""

    sync: str
    connection_id: str
    role: str
    holder: str | None
    token: int
    expires_at: datetime | None
    granted_at: datetime | None
    renewed_at: datetime | None


def database_now(conn: Connection) -> datetime:
    """The time every host agrees on: the database server's clock (SQLite: this host's)."""
    if conn.dialect.name == "postgresql":
        value = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
        return value.astimezone(timezone.utc)
    return datetime.now(timezone.utc)


def _where(sync: str, connection_id: str, role: str) -> tuple[Any, ...]:
    return (leases.c.sync == sync, leases.c.connection_id == connection_id, leases.c.role == role)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown lease role {role!r}; expected one of {', '.join(ROLES)}")


def acquire(conn: Connection, sync: str, connection_id: str, role: LeaseRole, holder: str, ttl_s: float) -> Lease:
    """Grant the lease to ``holder`` in ``conn``'s transaction, or raise :class:`LeaseHeldError`.

    Free and expired leases are granted; a live one is refused whoever holds it (a run is not
    re-entrant: a second grant to the same holder would hide a second copy of it).
    """
    _check_role(role)
    if not 0 < len(holder) <= 64:
        raise ValueError(f"a lease holder is a run id of 1 to 64 characters, got {holder!r}")
    if ttl_s <= 0:
        raise ValueError("a lease's ttl_s must be positive")
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        insert(leases)
        .values(sync=sync, connection_id=connection_id, role=role, holder=None, token=0)
        .on_conflict_do_nothing(index_elements=["sync", "connection_id", "role"])
    )
    row = conn.execute(
        select(leases.c.holder, leases.c.token, leases.c.expires_at)
        .where(*_where(sync, connection_id, role))
        .with_for_update()
    ).one()
    now = database_now(conn)
    if row.holder is not None and row.expires_at is not None and row.expires_at > now:
        raise LeaseHeldError(
            f"another run ({row.holder}) holds the {role} lease of {sync} for connection {connection_id!r} "
            f"until {row.expires_at.isoformat(timespec='seconds')} unless it renews",
            holder=row.holder,
            expires_at=row.expires_at,
        )
    expires_at = now + timedelta(seconds=ttl_s)
    token = row.token + 1
    conn.execute(
        update(leases)
        .where(*_where(sync, connection_id, role))
        .values(holder=holder, token=token, expires_at=expires_at, granted_at=now, renewed_at=now)
    )
    if row.holder is not None:
        _log.warning(
            "took over the expired %s lease of %s/%s from %s (token %d -> %d)",
            role,
            sync,
            connection_id,
            row.holder,
            row.token,
            token,
        )
    return Lease(sync, connection_id, role, holder, token, expires_at)


def renew(conn: Connection, lease: Lease, ttl_s: float) -> Lease:
    """Extend a lease whose token is still current (expired or not: nobody else took it)."""
    now = database_now(conn)
    expires_at = now + timedelta(seconds=ttl_s)
    renewed = conn.execute(
        update(leases)
        .where(
            *_where(lease.sync, lease.connection_id, lease.role),
            leases.c.token == lease.token,
            leases.c.holder == lease.holder,
        )
        .values(expires_at=expires_at, renewed_at=now)
    ).rowcount
    if not renewed:
        raise _lost(conn, lease)
    return replace(lease, expires_at=expires_at)


def release(conn: Connection, lease: Lease) -> bool:
    """Give the lease up (if still held); the next run is granted it at once instead of at expiry."""
    released = conn.execute(
        update(leases)
        .where(
            *_where(lease.sync, lease.connection_id, lease.role),
            leases.c.token == lease.token,
            leases.c.holder == lease.holder,
        )
        .values(holder=None, expires_at=None)
    ).rowcount
    return bool(released)


def check_lease(conn: Connection, lease: Lease) -> None:
    """The fence: raise :class:`LeaseLostError` unless ``lease`` is current, in ``conn``'s transaction.

    The row stays share-locked until that transaction ends, so no grant can slip in between this
    check and the commit of what the transaction writes. Renewals (an update of non-key columns)
    do not conflict with the lock and are never held up by a long write.
    """
    query = select(leases.c.holder, leases.c.token).where(*_where(lease.sync, lease.connection_id, lease.role))
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True, key_share=True)
    row = conn.execute(query).first()
    if row is None or row.token != lease.token or row.holder != lease.holder:
        raise _lost(conn, lease, row)


def _renewed_since(first: LeaseHeldError, now: LeaseHeldError) -> bool:
    """Whether the holder seen first has renewed since, which only a live holder does."""
    return now.holder != first.holder or (
        now.expires_at is not None and first.expires_at is not None and now.expires_at > first.expires_at
    )


def _lost(conn: Connection, lease: Lease, row: Any = None) -> LeaseLostError:
    if row is None:
        row = conn.execute(
            select(leases.c.holder, leases.c.token).where(*_where(lease.sync, lease.connection_id, lease.role))
        ).first()
    if row is None or row.holder is None:
        now = "it is free"
    elif row.holder == lease.holder:
        now = f"it was granted again (token {row.token})"
    else:
        now = f"run {row.holder} holds it with token {row.token}"
    return LeaseLostError(f"{lease.describe()} was lost: {now}; this run writes nothing more")


class Leases:
    """Lease operations, each in its own transaction (the fence runs in the writer's)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def acquire(
        self,
        sync: str,
        connection_id: str,
        role: LeaseRole,
        holder: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
        only_for_a_dead_holder: bool = False,
        on_wait: Any = None,
    ) -> Lease:
        """Grant the lease, waiting up to ``wait_s`` for its holder to release it or let it expire.

        ``only_for_a_dead_holder`` ends the wait as soon as the holder renews: it is alive and will
        do the work itself (a drain finds its events drained by the live drainer). ``on_wait(error)``
        is called once, when the first attempt finds the lease held. Raises
        :class:`LeaseHeldError` when the wait is over.
        """
        deadline = time.monotonic() + wait_s
        first: LeaseHeldError | None = None
        while True:
            try:
                with unavailable_as_store_error(), self._engine.begin() as conn:
                    return acquire(conn, sync, connection_id, role, holder, ttl_s)
            except LeaseHeldError as error:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                if first is None:
                    first = error
                    if on_wait is not None:
                        on_wait(error)
                elif only_for_a_dead_holder and _renewed_since(first, error):
                    raise
                time.sleep(min(WAIT_POLL_S, remaining))

    @contextmanager
    def hold(
        self,
        sync: str,
        connection_id: str,
        role: LeaseRole,
        holder: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
        only_for_a_dead_holder: bool = False,
        log: Any = None,
    ) -> Iterator[LeaseKeeper]:
        """Hold the ``role`` lease of (sync, connection) for ``holder`` (a run id) while the block
        runs: granted as :meth:`acquire` grants it (waiting up to ``wait_s``, then raising
        :class:`LeaseHeldError`), renewed on a thread, released at the end. Pass
        ``keeper.lease`` to ``Store.writer`` so every write is fenced."""

        def waiting(error: LeaseHeldError) -> None:
            if log is not None:
                log.info(f"{error}; waiting up to {wait_s:.0f} s for it")

        lease = self.acquire(
            sync,
            connection_id,
            role,
            holder,
            ttl_s=ttl_s,
            wait_s=wait_s,
            only_for_a_dead_holder=only_for_a_dead_holder,
            on_wait=waiting,
        )
        keeper = LeaseKeeper(self, lease, ttl_s=ttl_s, log=log).start()
        try:
            yield keeper
        finally:
            keeper.stop()

    def renew(self, lease: Lease, *, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            return renew(conn, lease, ttl_s)

    def release(self, lease: Lease) -> bool:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            return release(conn, lease)

    def check(self, lease: Lease) -> None:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            check_lease(conn, lease)

    def live_holder(self, sync: str, connection_id: str, role: LeaseRole) -> str | None:
        """The run holding the lease now (unexpired, by the database's clock), or None."""
        with unavailable_as_store_error(), reading(self._engine) as conn:
            row = conn.execute(
                select(leases.c.holder, leases.c.expires_at).where(*_where(sync, connection_id, role))
            ).first()
            now = database_now(conn)
        if row is None or row.holder is None or row.expires_at is None or row.expires_at <= now:
            return None
        return str(row.holder)

    def list(self, sync: str | None = None) -> list[LeaseState]:
        query = select(leases).order_by(leases.c.sync, leases.c.connection_id, leases.c.role)
        if sync is not None:
            query = query.where(leases.c.sync == sync)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [LeaseState(**row) for row in conn.execute(query).mappings()]


class LeaseKeeper:
    """Holds a granted lease for a run: renews it on a thread, releases it at the end.

    Renewal failures that are the database's (unreachable, busy) are retried at the next tick; the
    fence keeps writes correct meanwhile. A renewal that finds the lease taken marks it lost and
    stops: :meth:`check` then raises, so a run can stop fetching at once instead of at its next write.
    """

    def __init__(self, leases_: Leases, lease: Lease, *, ttl_s: float, log: Any = None) -> None:
        self._leases = leases_
        self._ttl_s = ttl_s
        self._log = log or _log
        self._lock = threading.Lock()
        self._lease = lease
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew_until_stopped, name=f"lease {lease.sync}/{lease.connection_id}", daemon=True
        )

    @property
    def lease(self) -> Lease:
        with self._lock:
            return self._lease

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if a renewal found the lease taken over."""
        if self._lost is not None:
            raise self._lost

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._ttl_s)
        if self._lost is None:
            try:
                self._leases.release(self.lease)
            except StoreError as error:  # it expires on its own
                self._log.warning(f"could not release {self.lease.describe()}: {error}")

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            try:
                renewed = self._leases.renew(self.lease, ttl_s=self._ttl_s)
            except LeaseLostError as error:
                self._lost = error
                self._log.error(str(error))
                return
            except Exception as error:  # noqa: BLE001 - retried next tick; the fence guards writes
                self._log.warning(f"could not renew {self.lease.describe()}: {type(error).__name__}: {error}")
                continue
            with self._lock:
                self._lease = renewed
