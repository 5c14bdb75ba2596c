"""Group commit: concurrent deliveries share one database transaction, each answered after it.

A commit costs a round trip and a WAL flush, whatever it holds: one transaction per delivery
caps a receiver at a few hundred deliveries/s. Here every request puts its delivery on a queue
and awaits a future; a single writer task takes whatever has accumulated, commits it in one
transaction on a worker thread, and resolves each future only after that commit returned. While
a commit is in flight the next batch accumulates, so batches grow with the load by themselves.

Failure isolation: if the database is unavailable, every request of that batch gets the error
(and answers 503). If the batch fails for another reason, something in one delivery is at fault:
each delivery is then committed on its own, so only the culprit fails.

Deadline: a database that does not answer at all (frozen: no error, no timeout ever fires)
would hold every request. With ``deadline_s``, a request whose commit has not returned by then
gets :class:`CommitDeadlineError` (503: the provider retries). Its delivery stays in the
transaction it was in and may still commit later; the retry is then a duplicate, stored once.
Once a commit has been in flight longer than the deadline, new submissions are refused at once
instead of queueing behind it, and queued ones whose request already gave up are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sync_project.receiver.threads import DaemonThreadPool
from sync_project.store import StoreUnavailableError

Item = TypeVar("Item")
Result = TypeVar("Result")

#: ``commit(items) -> one result or exception per item``; raising fails the whole batch.
CommitFn = Callable[[Sequence[Item]], Sequence["Result | Exception"]]

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More deliveries are waiting than the receiver accepts: shed load (HTTP 503)."""


class CommitterClosedError(Exception):
    """The receiver is shutting down and takes no more deliveries (HTTP 503)."""


class CommitDeadlineError(StoreUnavailableError):
    """No commit within the deadline: the database does not answer (HTTP 503).

    The delivery may still be committed later, by the transaction it was queued for.
    """


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


_STOP = object()


def _expire(future: asyncio.Future[Any], deadline_s: float) -> None:
    if not future.done():
        future.set_exception(CommitDeadlineError(f"no commit within {deadline_s:g} s"))


class GroupCommitter(Generic[Item, Result]):
    """Batches concurrent submissions into one commit; see the module docstring."""

    def __init__(
        self,
        commit: CommitFn[Item, Result],
        *,
        max_batch: int = 1000,
        max_queue: int = 10_000,
        writers: int = 1,
        deadline_s: float | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or writers < 1:
            raise ValueError("max_batch, max_queue and writers must be at least 1")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        self._commit = commit
        self._writers = writers
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._deadline_s = deadline_s
        self._queue: asyncio.Queue[object] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: DaemonThreadPool | None = None
        self._closed = False
        #: When each writer's current commit started (monotonic), for :meth:`stalled_for`.
        self._in_flight: dict[int, float] = {}
        #: Commits done and deliveries in them: the benchmark reports the mean batch size.
        self.commits = 0
        self.committed_items = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = DaemonThreadPool(self._writers, "inbox-writer")
        self._closed = False
        self._in_flight = {}
        self._tasks = [asyncio.create_task(self._run(n), name=f"inbox-group-commit-{n}") for n in range(self._writers)]

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Commit everything already submitted, then stop the writer.

        With ``timeout_s`` (default: the deadline), give up after that long: a commit stuck in a
        database that does not answer is left to its daemon thread, and what was still queued is
        refused with :class:`CommitterClosedError`. True if everything was committed or refused by
        the database, False if it gave up.
        """
        self._closed = True
        timeout_s = self._deadline_s if timeout_s is None else timeout_s
        finished = True
        if self._queue is not None:
            for _ in self._tasks:
                self._queue.put_nowait(_STOP)  # unbounded: submit() enforces max_queue itself
            if self._tasks:
                _, stuck = await asyncio.wait(self._tasks, timeout=timeout_s)
                if stuck:
                    finished = False
                    log.warning("group commit stopped with a commit still waiting for the database")
                    for task in stuck:
                        task.cancel()
                    await asyncio.gather(*stuck, return_exceptions=True)
            self._refuse_queued(CommitterClosedError("the receiver is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=finished, cancel_futures=not finished)
        self._queue, self._tasks, self._executor = None, [], None
        return finished

    def stalled_for(self) -> float:
        """Seconds the oldest commit in flight has been waiting for the database (0: none)."""
        if not self._in_flight:
            return 0.0
        return max(0.0, time.monotonic() - min(self._in_flight.values()))

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait until the transaction that holds it has committed.

        Raises :class:`CommitDeadlineError` when that takes longer than the deadline, or at once
        while a commit has been stalled for longer than it.
        """
        if self._closed or self._queue is None:
            raise CommitterClosedError("the receiver is shutting down")
        if self._deadline_s is not None and (stalled := self.stalled_for()) > self._deadline_s:
            raise CommitDeadlineError(f"a commit has been waiting {stalled:.1f} s for the database")
        if self._queue.qsize() >= self._max_queue:
            raise QueueFullError(f"{self._max_queue} deliveries already waiting for a commit")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put_nowait(_Pending(item, future))
        if self._deadline_s is None:
            return await future
        # A timer that fails the future, not asyncio.wait_for: that wraps every request's wait in
        # callbacks and a second future, a tenth of the event loop's CPU per delivery. A writer
        # that has not taken the item yet drops it once its future is done.
        expiry = loop.call_later(self._deadline_s, _expire, future, self._deadline_s)
        try:
            return await future
        finally:
            expiry.cancel()

    async def _run(self, writer: int) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch: list[_Pending[Item, Result]] = [first]  # type: ignore[list-item]
            while len(batch) < self._max_batch:
                try:
                    queued = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if queued is _STOP:
                    stopping = True
                    break
                batch.append(queued)  # type: ignore[arg-type]
            # A request whose deadline passed was answered 503: its provider will
            # retry, so committing it now would only lengthen a commit the database is slow with.
            batch = [p for p in batch if not p.future.done()]
            if not batch:
                continue
            self._in_flight[writer] = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._commit_isolating, [p.item for p in batch])
            except asyncio.CancelledError:  # stop() gave up on a commit the database never answered
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(CommitterClosedError("the receiver is shutting down"))
                raise
            except Exception as error:  # noqa: BLE001 - never leave a request waiting forever
                log.error("group commit writer failed: %s", type(error).__name__)
                outcomes = [error] * len(batch)
            finally:
                self._in_flight.pop(writer, None)
            self.commits += 1
            self.committed_items += len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():  # the client went away; its delivery is committed anyway
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    def _refuse_queued(self, error: Exception) -> None:
        while self._queue is not None:
            try:
                queued = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if queued is not _STOP and not queued.future.done():  # type: ignore[attr-defined]
                queued.future.set_exception(error)  # type: ignore[attr-defined]

    def _commit_isolating(self, items: Sequence[Item]) -> Sequence[Result | Exception]:
        try:
            outcomes = self._commit(items)
        except StoreUnavailableError as error:
            return [error] * len(items)
        except Exception as error:  # noqa: BLE001 - isolate the culprit below
            if len(items) == 1:
                return [error]
            log.warning(
                "group commit of %d deliveries failed (%s); committing them one by one",
                len(items),
                type(error).__name__,
            )
            return [self._commit_one(item) for item in items]
        if len(outcomes) != len(items):
            raise AssertionError(f"commit returned {len(outcomes)} outcomes for {len(items)} items")
        return outcomes

    def _commit_one(self, item: Item) -> Result | Exception:
        try:
            return self._commit([item])[0]
        except Exception as error:  # noqa: BLE001 - reported to that one request
            return error
