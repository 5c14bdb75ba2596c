"""The receiver's view of its database: reached and migrated yet, and answering now.

Services start in any order, so the receiver serves while its database is down: until the schema
has been brought to the newest revision once (which needs the database), every delivery is
answered 503 with ``Retry-After`` and ``/healthz`` says the database is unavailable. A background
task keeps trying, with a short capped backoff, and the receiver takes deliveries as soon as it
succeeds, without a restart.

Each answer about the database is given within the commit deadline, whatever the database does:
a probe that does not return in time means "unavailable", and only one probe is in flight at a
time, so a health checker polling a frozen database does not pile up threads and connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sync_project.receiver.threads import DaemonThreadPool
from sync_project.store import Store

T = TypeVar("T")

#: Longest pause between two attempts to reach a database that is down.
RETRY_MAX_S = 2.0
#: A database still unreachable is logged again after this long, not on every attempt.
LOG_EVERY_S = 30.0

log = logging.getLogger("sync_project.receiver")


class DatabaseGate:
    """Whether the receiver's database can take a delivery; see the module docstring.

    ``stalled_for`` is the group committer's: a commit waiting longer than the deadline already
    says the database does not answer, with no probe needed.
    """

    def __init__(self, store: Store, *, deadline_s: float, stalled_for: Callable[[], float]) -> None:
        self._store = store
        self._deadline_s = deadline_s
        self._stalled_for = stalled_for
        self._ready = asyncio.Event()
        self._pool: DaemonThreadPool | None = None
        self._becoming_ready: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[None] | None = None
        self._probe_started = 0.0

    @property
    def ready(self) -> bool:
        """The database was reached and its schema is current (once true, it stays true)."""
        return self._ready.is_set()

    async def start(self) -> None:
        """Start reaching the database; wait for it at most the deadline, then serve anyway."""
        self._pool = DaemonThreadPool(1, "receiver-database")
        self._becoming_ready = asyncio.create_task(self._become_ready(), name="receiver-database-ready")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), self._deadline_s)

    async def stop(self) -> None:
        if self._becoming_ready is not None:
            self._becoming_ready.cancel()
            await asyncio.gather(self._becoming_ready, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._becoming_ready, self._pool, self._probe = None, None, None

    async def unavailable(self) -> str | None:
        """None if the database answers a write transaction within the deadline, else why not."""
        if not self.ready:
            return "not reached yet since the receiver started"
        stalled = self._stalled_for()
        if stalled > self._deadline_s:
            return f"a commit has been waiting {stalled:.1f} s"
        if self._probe is None or self._probe.done():
            self._probe = self._in_thread(self._answers)
            self._probe.add_done_callback(_observed)  # its outcome may come after every waiter left
            self._probe_started = time.monotonic()
        remaining = self._deadline_s - (time.monotonic() - self._probe_started)
        try:
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(self._probe), remaining)
        except TimeoutError:
            return f"no answer within {self._deadline_s:g} s"
        except Exception as error:  # noqa: BLE001 - any failure means "unavailable"
            return type(error).__name__  # the type only: a driver's message may quote a URL
        return None

    async def _become_ready(self) -> None:
        started = time.monotonic()
        delay = 0.25
        last_logged: float | None = None
        while True:
            try:
                # Unbounded on purpose: a database that is slow to answer or migrating is waited
                # for here, in the background; deliveries meanwhile get their 503 at once.
                await self._in_thread(self._store.upgrade_schema)
            except Exception as error:  # noqa: BLE001 - down, or refused: try again
                now = time.monotonic()
                if last_logged is None or now - last_logged >= LOG_EVERY_S:
                    log.warning("database unavailable, answering 503 until it is back: %s", type(error).__name__)
                    last_logged = now
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._ready.set()
            if last_logged is not None:
                log.info("database available after %.1f s; taking deliveries", time.monotonic() - started)
            return

    def _answers(self) -> None:
        # A write transaction, like a delivery's: on SQLite it takes the write lock (BEGIN
        # IMMEDIATE), so a database too busy to accept deliveries is reported as such.
        self._store.inbox.answers()

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)


def _observed(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never retrieved
