"""Per-token rate limiting: a token bucket per API token, answering 429 with ``Retry-After``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field


class RateLimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    #: Sustained requests per second per token.
    rate_per_s: float = Field(default=10.0, gt=0)
    #: Requests a token may make in a burst after being idle.
    burst: int = Field(default=20, ge=1)


class RateLimiter:
    """Token buckets keyed by API token; thread-safe (routes run in Starlette's thread pool)."""

    def __init__(
        self, settings: RateLimitSettings | None = None, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or RateLimitSettings()
        self._monotonic = monotonic
        self._buckets: dict[str, tuple[float, float]] = {}  # token -> (tokens left, at)
        self._lock = threading.Lock()
        #: Requests answered 429 so far.
        self.rejected = 0

    def configure(self, settings: RateLimitSettings) -> None:
        with self._lock:
            self.settings = settings
            self._buckets.clear()

    def acquire(self, key: str) -> int | None:
        """None if the request may proceed, else the whole seconds to wait (for ``Retry-After``)."""
        with self._lock:
            settings = self.settings
            if not settings.enabled:
                return None
            now = self._monotonic()
            tokens, at = self._buckets.get(key, (float(settings.burst), now))
            tokens = min(float(settings.burst), tokens + (now - at) * settings.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return None
            self._buckets[key] = (tokens, now)
            self.rejected += 1
            # Retry-After is whole seconds; rounding up means a client that honours it succeeds.
            return max(1, math.ceil((1.0 - tokens) / settings.rate_per_s))
