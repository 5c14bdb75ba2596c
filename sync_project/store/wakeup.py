"""Waking a drainer when its partition's inbox gets events: Postgres ``LISTEN/NOTIFY``, SQLite a poll.

The receiver's insert transaction sends ``NOTIFY sync_inbox, '<sync>|<connection>'`` for each
partition it added events to (:func:`notify_inserted`); Postgres delivers it at commit, so a
woken drainer's claim finds the rows. A drainer that has drained everything listens on its own
session and sleeps until its partition is named, or ``fallback_s`` passes: the fallback bounds
what a lost notification (a dropped listening session, an event that was not due yet when it
arrived, a retry coming due) can cost, and it is the only database traffic of an idle drainer.

SQLite has no notifications between processes, so there the wait is a plain sleep of
``SQLITE_POLL_S``: one indexed ``SELECT`` every half second per drainer is modest for the
single-host database SQLite is meant for here.

A provider's standby drainer listens for every partition of its syncs (:class:`InboxListener`),
one session for all of them.

Notifications are database-wide, but a store lives in a schema (the session's ``search_path``):
the channel is named after the schema (``sync_inbox:<schema>``, cut to Postgres' 63 bytes), so two
stores in one database (two deployments, or tests side by side) never wake each other's drainers.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

CHANNEL = "sync_inbox"
#: The channel of the session's store, computed by the server on both sides so they always agree.
_CHANNEL_SQL = f"left('{CHANNEL}:' || current_schema(), 63)"
#: Postgres: the longest an idle drainer sleeps without a notification before it claims anyway.
DEFAULT_FALLBACK_S = 2.0
#: SQLite: how often an idle drainer claims (no cross-process notifications).
SQLITE_POLL_S = 0.5

_log = logging.getLogger(__name__)


def partition_payload(sync: str, connection_id: str) -> str:
    return f"{sync}|{connection_id}"


def notify_inserted(conn: Connection, partitions: Iterable[tuple[str, str]]) -> None:
    """Queue one notification per (sync, connection) in ``conn``'s transaction (Postgres only):
    delivered when it commits, dropped if it rolls back, so a drainer never wakes for rows it
    cannot see."""
    if conn.dialect.name != "postgresql":
        return
    for sync, connection_id in sorted(set(partitions)):
        conn.execute(
            text(f"SELECT pg_notify({_CHANNEL_SQL}, :payload)"),
            {"payload": partition_payload(sync, connection_id)},
        )


class _Listening:
    """A session of its own in ``LISTEN "sync_inbox:<schema>"`` (Postgres); on SQLite, nothing to listen on."""

    def __init__(self, engine: Engine, *, fallback_s: float = DEFAULT_FALLBACK_S) -> None:
        self._engine = engine
        self._fallback_s = fallback_s
        self._raw: Any = None

    @property
    def listening(self) -> bool:
        return self._raw is not None

    @property
    def session_pid(self) -> int | None:
        """The listening session's backend pid (Postgres), for an operator's or a test's eyes."""
        return None if self._raw is None else int(self._raw.get_backend_pid())

    def open(self) -> Any:
        if self._engine.dialect.name != "postgresql" or self._raw is not None:
            return self
        try:
            # A session of its own (not from the pool): it stays in LISTEN for the run's life.
            proxy = self._engine.raw_connection()
            proxy.detach()  # never back to the pool in autocommit and LISTEN
            raw: Any = proxy.dbapi_connection  # psycopg2's connection; SQLAlchemy types it as the DBAPI protocol
            raw.autocommit = True
            with raw.cursor() as cursor:
                cursor.execute(f"SELECT {_CHANNEL_SQL}")
                channel = cursor.fetchone()[0]
                cursor.execute('LISTEN "{}"'.format(channel.replace('"', '""')))
            self._raw = raw
        except Exception as error:  # noqa: BLE001 - the fallback poll still drains
            _log.warning(
                f"inbox wake-up: cannot LISTEN ({type(error).__name__}: {error}); polling every {self._fallback_s} s"
            )
            self._raw = None
        return self

    def _wait_for(self, timeout_s: float | None, accept: Callable[[str], bool]) -> set[str] | None:
        """The accepted payloads that arrived before the wait ran out (None: it ran out)."""
        limit = self._fallback_s if timeout_s is None else min(timeout_s, self._fallback_s)
        if self._engine.dialect.name != "postgresql":
            time.sleep(max(0.0, min(limit, SQLITE_POLL_S)))
            return None
        if self._raw is None:
            self.open()
            if self._raw is None:
                time.sleep(max(0.0, limit))
                return None
        deadline = time.monotonic() + limit
        while True:
            try:
                named = self._collect(accept)
                if named:
                    return named
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                select.select([self._raw], [], [], remaining)
            except Exception as error:  # noqa: BLE001 - a dropped session: listen again next wait
                _log.warning(f"inbox wake-up: listening session lost ({type(error).__name__}: {error})")
                self._discard()
                time.sleep(max(0.0, deadline - time.monotonic()))
                return None

    def _collect(self, accept: Callable[[str], bool]) -> set[str]:
        self._raw.poll()
        named: set[str] = set()
        while self._raw.notifies:
            payload = self._raw.notifies.pop(0).payload
            if accept(payload):
                named.add(payload)
        return named

    def _discard(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # noqa: BLE001 - already gone
                pass

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> Any:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class InboxWakeup(_Listening):
    """Sleeps until (sync, connection) gets new inbox events or a bounded fallback passes.

    Listen with :meth:`open` before the first claim, so an event committed between a claim that
    found nothing and the wait still wakes the wait. Closing releases the listening session.
    """

    def __init__(
        self, engine: Engine, sync: str, connection_id: str, *, fallback_s: float = DEFAULT_FALLBACK_S
    ) -> None:
        super().__init__(engine, fallback_s=fallback_s)
        self._payload = partition_payload(sync, connection_id)
        self.notified = 0

    def wait(self, timeout_s: float | None = None) -> bool:
        """Return True when the partition was named, False when the wait ran out."""
        named = self._wait_for(timeout_s, lambda payload: payload == self._payload) is not None
        if named:
            self.notified += 1
        return named


class InboxListener(_Listening):
    """Sleeps until any partition of ``syncs`` gets new inbox events (a standby drainer's wait).

    :meth:`wait` returns the (sync, connection) pairs named since the last wait, or None when the
    wait ran out (on SQLite: after ``SQLITE_POLL_S``), when the caller scans for due events instead.
    """

    def __init__(self, engine: Engine, syncs: Iterable[str], *, fallback_s: float = DEFAULT_FALLBACK_S) -> None:
        super().__init__(engine, fallback_s=fallback_s)
        self._syncs = frozenset(syncs)

    def _accept(self, payload: str) -> bool:
        return payload.partition("|")[0] in self._syncs

    def wait(self, timeout_s: float | None = None) -> set[tuple[str, str]] | None:
        named = self._wait_for(timeout_s, self._accept)
        if named is None:
            return None
        return {(sync, connection_id) for sync, _, connection_id in (p.partition("|") for p in named)}
