"""HTTP behaviour every provider client shares: retries on 429/5xx, clear auth and body errors.

Implemented as an httpx transport wrapper so provider modules keep using plain ``httpx.Client``.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import httpx

#: How a client waits (``time.sleep``); tests pass their own to assert waits without waiting them.
Sleep = Callable[[float], None]
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ProviderError(Exception):
    """The provider answered something a sync cannot use; the message names the cause."""


class ProviderAuthError(ProviderError):
    """401/403: the connection's credentials are wrong, expired or lack a scope."""


class RetryingTransport(httpx.BaseTransport):
    """Retries 429 and 5xx with exponential backoff, honouring ``Retry-After`` when given."""

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
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


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def make_client(
    base_url: str,
    *,
    headers: dict[str, str] | None = None,
    auth: httpx.Auth | None = None,
    timeout_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
    max_attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Client:
    """An ``httpx.Client`` with retries. ``transport`` lets tests serve fixtures and ``sleep`` lets
    them assert the waits a ``Retry-After`` asked for without waiting them."""
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        auth=auth,
        timeout=timeout_s,
        transport=RetryingTransport(transport, max_attempts=max_attempts, sleep=sleep),
    )


def json_body(response: httpx.Response) -> Any:
    """The JSON body of a successful response, or a :class:`ProviderError` naming what went wrong."""
    request = response.request
    where = f"{request.method} {request.url.copy_with(query=None)}"
    if response.status_code in (401, 403):
        raise ProviderAuthError(f"{where}: HTTP {response.status_code}: check the connection's credentials")
    if response.status_code >= 400:
        raise ProviderError(f"{where}: HTTP {response.status_code}: {response.text[:200]}")
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProviderError(f"{where}: response is not JSON: {response.text[:80]!r}") from None
