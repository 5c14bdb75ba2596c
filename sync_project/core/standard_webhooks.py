"""Standard Webhooks (standardwebhooks.com) signing and verification, shared by both ends.

The bundled sandbox signs its deliveries with :func:`sign_headers`; the sandbox provider verifies
them with :func:`verify`. Keeping both in one module means the two ends cannot drift apart, and the
published reference vector (tested) pins them to the spec rather than to each other.

Scheme: ``webhook-signature: v1,<base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))>`` where
``key`` is the base64-decoded secret after its ``whsec_`` prefix. Several space-separated signatures
may be present (key rotation); versions other than ``v1`` (e.g. ``v1a``, ed25519) are ignored.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets as _secrets
import time
from collections.abc import Mapping, Sequence

from sync_project.core.provider import SignatureError
from sync_project.core.signing import parse_epoch

SECRET_PREFIX = "whsec_"
#: The Python reference library rejects timestamps further than this in the past or the future.
DEFAULT_TOLERANCE_S = 5 * 60
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


class WebhookSecretError(ValueError):
    """A configured secret is not ``whsec_`` + base64: a configuration error, not a bad delivery."""


def generate_secret(num_bytes: int = 24) -> str:
    """A fresh ``whsec_`` secret, as a provider dashboard would show it."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(num_bytes)).decode()


def decode_secret(secret: str) -> bytes:
    """The HMAC key of ``secret`` (the prefix is optional, as in the reference libraries).

    Padding is optional too: the reference library pads the secret before decoding, so a secret
    shown without its ``=`` works there and must work here. Other characters outside base64's
    alphabet are refused (the reference library skips them silently, which turns a typo into a
    different key).
    """
    raw = secret.strip()
    if raw.startswith(SECRET_PREFIX):
        raw = raw[len(SECRET_PREFIX) :]
    raw = raw.rstrip("=")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError("webhook secret is not whsec_ followed by base64") from None
    if not key:
        raise WebhookSecretError("webhook secret is empty")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of one delivery attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.digest(decode_secret(secret), signed, "sha256")
    return "v1," + base64.b64encode(digest).decode()


def sign_headers(secret: str, msg_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three headers of a delivery attempt (the timestamp is the attempt's, not the event's)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: signature(secret, msg_id, stamp, body),
    }


def verify(
    headers: Mapping[str, str],
    body: bytes,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> str:
    """Return the delivery's ``webhook-id`` if one of ``secrets`` signed it; else raise.

    ``headers`` must have lower-cased names. Raises :class:`SignatureError` for a delivery that is
    unsigned, stale, from the future or signed with another key, and :class:`WebhookSecretError`
    when a configured secret itself is unusable.
    """
    if not secrets:
        raise SignatureError("no webhook secret is configured, so no delivery can be verified")
    missing = [name for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER) if not headers.get(name)]
    if missing:
        raise SignatureError(f"missing header(s): {', '.join(missing)}")
    msg_id = headers[ID_HEADER]
    # Bounded digits before any arithmetic: `now - stamp` with a 310-digit stamp overflows a float.
    stamp = parse_epoch(headers[TIMESTAMP_HEADER], TIMESTAMP_HEADER)
    if stamp < now - tolerance_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is {int(now - stamp)} s old (tolerance {tolerance_s} s)")
    if stamp > now + tolerance_s:
        raise SignatureError(f"{TIMESTAMP_HEADER} is {int(stamp - now)} s in the future (tolerance {tolerance_s} s)")
    offered = [
        value.encode()
        for version, _, value in (part.partition(",") for part in headers[SIGNATURE_HEADER].split(" "))
        if version == "v1" and value
    ]
    if not offered:
        raise SignatureError(f"{SIGNATURE_HEADER} holds no v1 signature")
    for secret in secrets:
        expected = signature(secret, msg_id, stamp, body).partition(",")[2].encode()
        # compare_digest keeps the time taken independent of how much of a forged value matches.
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return msg_id
    raise SignatureError("no signature matches the configured secret(s)")
