"""HTTP behaviour every provider client shares: retries on 429/5xx, clear auth and body errors.

Implemented as an httpx transport wrapper (:mod:`sync_project.core.transports`) so provider modules
keep using plain ``httpx.Client``. httpx itself is imported only when a client is built: a run
process imports every provider module with the code location, and httpx is the heaviest part of
that import the project could avoid (see :mod:`sync_project.core`).
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

#: How a client waits (``time.sleep``); tests pass their own to assert waits without waiting them.
Sleep = Callable[[float], None]


class ProviderError(Exception):
    """The provider answered something a sync cannot use; the message names the cause."""


class ProviderAuthError(ProviderError):
    """401/403: the connection's credentials are wrong, expired or lack a scope."""


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
    sleep: Sleep = time.sleep,
) -> httpx.Client:
    """An ``httpx.Client`` with retries. ``transport`` lets tests serve fixtures and ``sleep`` lets
    them assert the waits a ``Retry-After`` asked for without waiting them."""
    import httpx

    from sync_project.core.transports import RetryingTransport

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
