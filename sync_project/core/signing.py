"""Webhook signature primitives shared by the provider modules (and by what signs our own deliveries).

Every comparison of a signature is constant-time (``hmac.compare_digest`` over bytes), and every
configured secret is tried in full, so neither timing nor rotation reveals which secret matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from datetime import datetime, timedelta

from sync_project.core.provider import SignatureError

#: Digits a Unix timestamp in seconds may have (up to the year 33658): anything longer is refused
#: before arithmetic, because a 310-digit integer overflows the float a comparison converts it to.
MAX_EPOCH_DIGITS = 12


def hmac_sha256(secret: str | bytes, message: bytes) -> bytes:
    """HMAC-SHA256 of ``message``; a text secret is used as its UTF-8 bytes, as the providers do."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    # The one-shot form runs in OpenSSL without building an HMAC object: a third of the cost.
    return hmac.digest(key, message, "sha256")


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


def parse_epoch(text: str | None, header: str, *, extra_digits: int = 0) -> int:
    """A signed Unix timestamp from a header, or :class:`SignatureError`.

    Only ASCII digits, at most :data:`MAX_EPOCH_DIGITS` (+ ``extra_digits`` for milliseconds),
    are read: ``int()`` alone also takes signs, spaces, underscores and non-ASCII digits, and any
    length, which later arithmetic cannot hold. The caller compares the result with
    :func:`check_freshness` in integer-sized numbers only.
    """
    value = (text or "").strip()
    if not value:
        raise SignatureError(f"missing {header}")
    limit = MAX_EPOCH_DIGITS + extra_digits
    if not (value.isascii() and value.isdigit()) or len(value) > limit:
        raise SignatureError(f"{header} is not a Unix timestamp of at most {limit} digits: {value[:40]!r}")
    return int(value)


def check_freshness(signed_at_s: float, received_at: datetime, tolerance: timedelta) -> None:
    """Reject a signed timestamp (Unix seconds) outside ``tolerance`` of the receipt, in the past
    (a replay) or the future (a clock that cannot be trusted to bound replays either).

    Compared as seconds, never as datetimes: a timestamp beyond the year 9999 is just too far off.
    """
    skew = received_at.timestamp() - signed_at_s
    limit = tolerance.total_seconds()
    if skew > limit:
        raise SignatureError(
            f"signature timestamp is {skew:.0f} s old, beyond the {limit:.0f} s tolerance "
            "(replayed or delayed delivery)"
        )
    if -skew > limit:
        raise SignatureError(
            f"signature timestamp is {-skew:.0f} s in the future, beyond the {limit:.0f} s tolerance "
            "(check the receiver's clock)"
        )
