"""Signed outbound webhooks, Standard Webhooks style, shared by sync notifications and forwarding.

Every attempt is signed afresh (the ``webhook-timestamp`` is the attempt's, so a consumer's
5-minute tolerance holds for a late retry) under the same ``webhook-id``, which is what a consumer
deduplicates on. A consumer verifies with any Standard Webhooks library, or with
:func:`sync_project.core.standard_webhooks.verify`.

The response body is never read: only the status matters, and a consumer that streams a large or
endless body cannot hold the sender.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sync_project.core.standard_webhooks import sign_headers

if TYPE_CHECKING:
    import httpx

USER_AGENT = "sync-project-webhooks/1"
#: Answers worth another attempt: the consumer is overloaded, restarting or timed out.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
#: Error text kept per attempt: a transport error's message, never a response body.
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Attempt:
    """One POST: the HTTP status, or the transport error that prevented one."""

    status_code: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """Transport errors, 5xx and the throttling/timeout 4xx: another attempt may succeed.
        Other 4xx mean the consumer refuses this request; repeating it the same second will not help."""
        if self.ok:
            return False
        if self.status_code is None:
            return True
        return self.status_code >= 500 or self.status_code in RETRYABLE_STATUS

    def describe(self) -> str:
        return f"HTTP {self.status_code}" if self.status_code is not None else (self.error or "no answer")


@dataclass
class DeliveryOutcome:
    """Every attempt of one delivery, and why it stopped."""

    attempts: list[Attempt] = field(default_factory=list)
    #: ``delivered``, ``attempts`` (all used), ``deadline`` (the time budget ran out) or
    #: ``refused`` (a status not worth retrying).
    stopped: str = "attempts"

    @property
    def delivered(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].ok

    def summary(self) -> str:
        count = len(self.attempts)
        last = self.attempts[-1].describe() if self.attempts else "no attempt"
        if self.delivered:
            return f"delivered ({last}, attempt {count})"
        why = {"deadline": ", time budget spent", "refused": ", refused (not retried)"}.get(self.stopped, "")
        return f"failed after {count} attempt(s){why}: {last}"


def post_signed(client: httpx.Client, url: str, secret: str, msg_id: str, body: bytes, *, timeout_s: float) -> Attempt:
    """One signed POST of ``body``; never raises for what the network or the consumer does."""
    # Here, not at the top: the code location imports this module, and needs httpx only to send.
    import httpx

    headers = {
        **sign_headers(secret, msg_id, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    try:
        with client.stream("POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s)) as response:
            return Attempt(status_code=response.status_code)
    except httpx.TimeoutException:
        return Attempt(error=f"timed out after {timeout_s:.1f} s")
    except httpx.HTTPError as error:
        return Attempt(error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])


def deliver(
    url: str,
    secret: str,
    msg_id: str,
    body: bytes,
    *,
    total_timeout_s: float,
    max_attempts: int,
    attempt_timeout_s: float,
    backoff_s: float = 0.25,
    client: httpx.Client | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryOutcome:
    """POST until delivered, ``max_attempts`` are used, or ``total_timeout_s`` is spent.

    The budget bounds everything: each attempt's timeouts are cut to what is left of it, and a
    backoff (``backoff_s``, doubling) that would outlast it is not slept. So a consumer that is
    down, slow or hanging costs the caller at most about ``total_timeout_s``.
    """
    if max_attempts < 1 or total_timeout_s <= 0 or attempt_timeout_s <= 0:
        raise ValueError("max_attempts, total_timeout_s and attempt_timeout_s must be positive")
    import httpx

    outcome = DeliveryOutcome()
    deadline = clock() + total_timeout_s
    owned = client is None
    http = client or httpx.Client(follow_redirects=False)
    try:
        delay = backoff_s
        for number in range(1, max_attempts + 1):
            remaining = deadline - clock()
            if remaining <= 0:
                outcome.stopped = "deadline"
                break
            attempt = post_signed(http, url, secret, msg_id, body, timeout_s=min(attempt_timeout_s, remaining))
            outcome.attempts.append(attempt)
            if attempt.ok:
                outcome.stopped = "delivered"
                break
            if not attempt.retryable:
                outcome.stopped = "refused"
                break
            if number == max_attempts:
                outcome.stopped = "attempts"
                break
            if deadline - clock() <= delay:
                outcome.stopped = "deadline"
                break
            sleep(delay)
            delay *= 2
    finally:
        if owned:
            http.close()
    return outcome
