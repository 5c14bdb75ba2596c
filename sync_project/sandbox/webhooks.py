"""Webhook delivery: a background worker that signs, sends and retries, like a real provider.

Each event passes through :class:`~sync_project.sandbox.chaos.Chaos` once (dropped, duplicated,
held back) and then waits in a queue ordered by due time. A delivery that fails (connection error or
a non-2xx answer) is rescheduled with exponential backoff until ``RetryPolicy.max_attempts``, so a
receiver that is down for a while still gets every event once it is back. Every attempt is signed
afresh (Standard Webhooks signs the attempt's timestamp); the ``webhook-id`` never changes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel, ConfigDict, Field

from sync_project.core import standard_webhooks
from sync_project.sandbox.chaos import Chaos, ChaosSettings
from sync_project.sandbox.data import ChangeEvent


class RetryPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Attempts per delivery, the first included; after the last failure it counts as ``failed``.
    max_attempts: int = Field(default=10, ge=1, le=100)
    initial_backoff_s: float = Field(default=1.0, gt=0)
    max_backoff_s: float = Field(default=60.0, gt=0)
    #: How long one attempt may take (Standard Webhooks suggests 15-30 s).
    timeout_s: float = Field(default=10.0, gt=0)

    def backoff_s(self, failed_attempts: int) -> float:
        return min(self.initial_backoff_s * 2 ** (failed_attempts - 1), self.max_backoff_s)


class DeliveryCounts(BaseModel):
    """What happened to the events so far; ``sent`` counts each acknowledged copy."""

    events: int = 0
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    failed: int = 0
    pending: int = 0
    attempts: int = 0
    retries: int = 0
    #: Events that happened while no webhook URL was configured (nobody was subscribed).
    unsubscribed: int = 0
    last_error: str | None = None


class DeliveriesPausedError(RuntimeError):
    """Waiting for the queue to drain while deliveries are paused would wait forever."""


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    event_id: str = field(compare=False)
    body: bytes = field(compare=False)
    failed_attempts: int = field(default=0, compare=False)


class DeliveryWorker:
    """Queues, signs and POSTs webhook deliveries on one background thread."""

    def __init__(
        self,
        secret: str,
        *,
        url: str | None = None,
        retry: RetryPolicy | None = None,
        chaos: Chaos | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        standard_webhooks.decode_secret(secret)  # fail now, not on the first delivery
        self.secret = secret
        self.url = url
        self.retry = retry or RetryPolicy()
        self.chaos = chaos or Chaos()
        self._monotonic = monotonic
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._in_flight = 0
        self._counts = DeliveryCounts()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop sending; deliveries still queued are abandoned (the sandbox is going away)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def set_chaos(self, settings: ChaosSettings) -> None:
        with self._cond:
            self.chaos.settings = settings
            self._cond.notify_all()

    def set_url(self, url: str | None) -> None:
        with self._cond:
            self.url = url
            self._cond.notify_all()

    # -- intake ---------------------------------------------------------------------------------

    def submit(self, event: ChangeEvent) -> None:
        """Queue the deliveries of one event (called in change order, under the data lock)."""
        with self._cond:
            if self.url is None:
                self._counts.unsubscribed += 1
                return
            self._counts.events += 1
            fate = self.chaos.fate()
            if fate.dropped:
                self._counts.dropped += 1
                return
            if fate.duplicated:
                self._counts.duplicated += 1
            body, now = event.body(), self._monotonic()
            for hold in fate.holds_s:
                heapq.heappush(self._queue, _Delivery(now + hold, next(self._seq), event.id, body))
            self._cond.notify_all()

    # -- observation ----------------------------------------------------------------------------

    def counts(self) -> DeliveryCounts:
        with self._cond:
            return self._counts.model_copy(update={"pending": len(self._queue) + self._in_flight})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until nothing is queued or in flight; False if ``timeout_s`` passed (or we stopped) first."""
        deadline = self._monotonic() + timeout_s
        with self._cond:
            while self._queue or self._in_flight:
                if self._stopping:
                    return False
                if self.chaos.settings.paused:
                    raise DeliveriesPausedError(
                        f"{len(self._queue) + self._in_flight} deliveries are pending but deliveries are paused"
                    )
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        with httpx.Client(timeout=self.retry.timeout_s, headers={"user-agent": "sync-project-sandbox"}) as client:
            while (delivery := self._next_due()) is not None:
                error = self._send(client, delivery)
                self._settle(delivery, error)

    def _next_due(self) -> _Delivery | None:
        with self._cond:
            while not self._stopping:
                if self.chaos.settings.paused or not self._queue:
                    self._cond.wait()
                    continue
                wait_s = self._queue[0].due - self._monotonic()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                self._in_flight += 1
                return heapq.heappop(self._queue)
            return None

    def _send(self, client: httpx.Client, delivery: _Delivery) -> str | None:
        """None on a 2xx, else what went wrong."""
        url = self.url
        if url is None:
            return "no webhook URL configured"
        headers = standard_webhooks.sign_headers(self.secret, delivery.event_id, delivery.body)
        headers["content-type"] = "application/json"
        try:
            response = client.post(url, content=delivery.body, headers=headers)
        except httpx.HTTPError as error:
            return f"POST {url}: {type(error).__name__}: {error}"
        if 200 <= response.status_code < 300:
            return None
        return f"POST {url}: HTTP {response.status_code}"

    def _settle(self, delivery: _Delivery, error: str | None) -> None:
        with self._cond:
            self._in_flight -= 1
            self._counts.attempts += 1
            if error is None:
                self._counts.sent += 1
            else:
                self._counts.last_error = error
                delivery.failed_attempts += 1
                if delivery.failed_attempts >= self.retry.max_attempts:
                    self._counts.failed += 1
                else:
                    self._counts.retries += 1
                    delivery.due = self._monotonic() + self.retry.backoff_s(delivery.failed_attempts)
                    heapq.heappush(self._queue, delivery)
            self._cond.notify_all()
