"""Group commit: concurrent deliveries share one database transaction, each answered after it.

A commit costs a round trip and a WAL flush, whatever it holds: one transaction per delivery
caps a receiver at a few hundred deliveries/s. Here every request puts its delivery on a queue
and awaits a future; a single writer task takes whatever has accumulated, commits it in one
transaction on a worker thread, and resolves each future only after that commit returned. While
a commit is in flight the next batch accumulates, so batches grow with the load by themselves.

Failure isolation: if the database is unavailable, every request of that batch gets the error
(and answers 503). If the batch fails for another reason, something in one delivery is at fault:
each delivery is then committed on its own, so only the culprit fails.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from sync_project.store.errors import StoreUnavailableError

Item = TypeVar("Item")
Result = TypeVar("Result")

#: ``commit(items) -> one result or exception per item``; raising fails the whole batch.
CommitFn = Callable[[Sequence[Item]], Sequence["Result | Exception"]]

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More deliveries are waiting than the receiver accepts: shed load (HTTP 503)."""


class CommitterClosedError(Exception):
    """The receiver is shutting down and takes no more deliveries (HTTP 503)."""


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


_STOP = object()


class GroupCommitter(Generic[Item, Result]):
    """Batches concurrent submissions into one commit; see the module docstring."""

    def __init__(
        self, commit: CommitFn[Item, Result], *, max_batch: int = 1000, max_queue: int = 10_000, writers: int = 1
    ) -> None:
        if max_batch < 1 or max_queue < 1 or writers < 1:
            raise ValueError("max_batch, max_queue and writers must be at least 1")
        self._commit = commit
        self._writers = writers
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._queue: asyncio.Queue[object] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        #: Commits done and deliveries in them: the benchmark reports the mean batch size.
        self.commits = 0
        self.committed_items = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self._max_queue)
        self._executor = ThreadPoolExecutor(max_workers=self._writers, thread_name_prefix="inbox-writer")
        self._closed = False
        self._tasks = [
            asyncio.create_task(self._run(), name=f"inbox-group-commit-{n}") for n in range(self._writers)
        ]

    async def stop(self) -> None:
        """Commit everything already submitted, then stop the writer."""
        self._closed = True
        if self._queue is not None:
            for _ in self._tasks:
                await self._queue.put(_STOP)
            await asyncio.gather(*self._tasks)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._queue, self._tasks, self._executor = None, [], None

    async def submit(self, item: Item) -> Result:
        """Queue ``item`` and wait until the transaction that holds it has committed."""
        if self._closed or self._queue is None:
            raise CommitterClosedError("the receiver is shutting down")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future))
        except asyncio.QueueFull:
            raise QueueFullError(f"{self._max_queue} deliveries already waiting for a commit") from None
        return await future

    async def _run(self) -> None:
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
            try:
                outcomes = await loop.run_in_executor(
                    self._executor, self._commit_isolating, [p.item for p in batch]
                )
            except Exception as error:  # noqa: BLE001 - never leave a request waiting forever
                log.error("group commit writer failed: %s", type(error).__name__)
                outcomes = [error] * len(batch)
            self.commits += 1
            self.committed_items += len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():  # the client went away; its delivery is committed anyway
                    continue
                if isinstance(outcome, Exception):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

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
