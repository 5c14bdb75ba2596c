"""Worker threads for database calls that may never return.

A call into a frozen database (a hung disk, SIGSTOP, a half-open connection) blocks its thread
until the server answers; no Python code can interrupt it. The receiver answers its client at the
deadline regardless, but the thread stays blocked. ``ThreadPoolExecutor`` threads are joined at
interpreter exit, so one such thread would keep a stopped receiver process alive for as long as
the database stays frozen. These threads are daemons: the process exits, and the server, once it
runs again, sees the connection close and rolls back whatever it had not committed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()


class DaemonThreadPool(Executor):
    """A fixed number of daemon threads running submitted calls in order (an ``Executor``)."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shutdown = False
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("the thread pool is shut down")
            self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, timeout_s: float | None = None) -> None:
        """Stop taking work; with ``wait``, join the threads for at most ``timeout_s``.

        A thread still blocked after that is left behind (it is a daemon); ``cancel_futures``
        cancels the calls that had not started.
        """
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            if cancel_futures:
                while True:
                    try:
                        item = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join(timeout_s)

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(error)
            else:
                future.set_result(result)
