"""Webhook signature primitives shared by the provider modules.

Every comparison of a signature is constant-time (``hmac.compare_digest`` over bytes), and every
configured secret is tried in full, so neither timing nor rotation reveals which secret matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from datetime import datetime, timedelta

from sync_project.core.provider import SignatureError


def hmac_sha256(secret: str | bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message``; a text secret is used as its UTF-8 bytes, as the providers do."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, message, hashlib.sha256).digest()


def matches_any(given: str, expected: Iterable[str]) -> bool:
    """Whether ``given`` equals one of ``expected``, compared in constant time, all of them tried."""
    given_bytes = given.encode("utf-8", "surrogateescape")
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(given_bytes, candidate.encode("utf-8"))
    return found


def require_secrets(secrets: list[str], env_name: str | None) -> None:
    """An unconfigured secret must reject every delivery, never accept it unsigned."""
    if not secrets:
        raise SignatureError(f"no webhook secret configured: set {env_name}")


def check_freshness(signed_at: datetime, received_at: datetime, tolerance: timedelta) -> None:
    """Reject a signed timestamp outside ``tolerance`` of the receipt, in the past (a replay) or
    the future (a clock that cannot be trusted to bound replays either)."""
    skew = received_at - signed_at
    if skew > tolerance:
        raise SignatureError(
            f"signature timestamp is {skew.total_seconds():.0f} s old, beyond the "
            f"{tolerance.total_seconds():.0f} s tolerance (replayed or delayed delivery)"
        )
    if -skew > tolerance:
        raise SignatureError(
            f"signature timestamp is {-skew.total_seconds():.0f} s in the future, beyond the "
            f"{tolerance.total_seconds():.0f} s tolerance (check the receiver's clock)"
        )
