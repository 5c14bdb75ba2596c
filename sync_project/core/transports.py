"""The httpx transports a provider client is built from: generic retries, and rate-limit waits.

Kept apart from :mod:`sync_project.core.http` because subclassing ``httpx.BaseTransport`` needs
httpx at import time, and a run process imports the code location (every provider module) long
before, if ever, it builds a client: ``make_client`` imports this module when it is called.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable

import httpx

from sync_project.core.http import Sleep, parse_retry_after

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Seconds a provider asks to wait before retrying ``response`` (the ``attempt``-th, its clock
#: reading ``now``), or None when the response is no rate limit.
RateLimitWait = Callable[[httpx.Response, int, float], float | None]
#: The error for a rate limit that outlasts the wait allowed: (request, response, wait s, attempts).
RateLimitError = Callable[[httpx.Request, httpx.Response, float, int], Exception]


class RetryingTransport(httpx.BaseTransport):
    """Retries 429 and 5xx with exponential backoff, honouring ``Retry-After`` when given."""

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._inner = inner or httpx.HTTPTransport()
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = self._inner.handle_request(request)
            except httpx.TransportError:
                if attempt == self._max_attempts:
                    raise
                self._sleep(self._delay(attempt, None))
                continue
            if response.status_code not in RETRY_STATUSES or attempt == self._max_attempts:
                return response
            response.read()
            response.close()
            self._sleep(self._delay(attempt, response.headers.get("retry-after")))
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, self._max_backoff_s)
        base = min(self._backoff_s * 2 ** (attempt - 1), self._max_backoff_s)
        return base * (0.5 + random.random() / 2)

    def close(self) -> None:
        self._inner.close()


class RateLimitTransport(httpx.BaseTransport):
    """Waits out a provider's rate limits (sitting under the generic 429/5xx retries), up to a bound.

    It sits inside :class:`RetryingTransport` and consumes the answers ``wait_for`` recognises as
    rate limits itself: the generic retry would come back within seconds, and some providers
    (GitHub) warn that requests made while limited can get an integration banned. When a wait
    would exceed ``max_wait_s``, or ``max_attempts`` are used, it raises what ``give_up`` builds
    instead of returning the response. The provider module owns both rules.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        wait_for: RateLimitWait,
        give_up: RateLimitError,
        sleep: Sleep = time.sleep,
        clock: Callable[[], float] = time.time,
        max_wait_s: float = 900.0,
        max_attempts: int = 4,
    ) -> None:
        self._inner = inner or httpx.HTTPTransport()
        self._wait_for = wait_for
        self._give_up = give_up
        self._sleep = sleep
        self._clock = clock
        self._max_wait_s = max_wait_s
        self._max_attempts = max_attempts

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(1, self._max_attempts + 1):
            response = self._inner.handle_request(request)
            wait = self._wait_for(response, attempt, self._now(response))
            if wait is None:
                return response
            response.read()
            response.close()
            if wait > self._max_wait_s or attempt == self._max_attempts:
                raise self._give_up(request, response, wait, attempt)
            self._sleep(wait)
        raise AssertionError("unreachable")

    def _now(self, response: httpx.Response) -> float:
        """The provider's clock when the response says it: reset times are on that clock."""
        value = response.headers.get("date")
        if value:
            try:
                return email.utils.parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError):
                pass
        return self._clock()

    def close(self) -> None:
        self._inner.close()
