"""The one clock: every "now" the package stores or compares is timezone-aware UTC.

One function rather than ``datetime.now(timezone.utc)`` at each call site, so a naive ``now()``
cannot slip in beside the aware ones (comparing the two raises at run time, not at review).
"""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
