"""Headers and timestamps from unauthenticated callers: every provider refuses what it cannot read
with :class:`SignatureError` (401) or, once verified, :class:`MalformedWebhookError` (400), never
another exception (which the receiver would answer with a 500 and a traceback).

The found case: a ``webhook-timestamp`` of 310 digits overflowed the float that ``now - stamp``
converts it to. Each value below is a kind of timestamp ``int()`` or ``datetime`` chokes on.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from sync_project.core import signing, standard_webhooks
from sync_project.core.provider import MalformedWebhookError, SignatureError
from sync_project.providers import hubspot, stripe
from sync_project_tests.providers._support import webhook

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
SW_SECRET = "whsec_" + "c2FuZGJveC1zZWNyZXQtZm9yLXRlc3Rz"

UNREADABLE_TIMESTAMPS = [
    pytest.param("9" * 310, id="310-digits"),
    pytest.param("9" * 5000, id="past-int-digit-limit"),
    pytest.param("99999999999999", id="past-year-9999"),
    pytest.param("-1700000000", id="negative"),
    pytest.param("+1740830400", id="plus-sign"),
    pytest.param("1_740_830_400", id="underscores"),
    pytest.param("١٧٤٠٨٣٠٤٠٠", id="arabic-indic-digits"),
    pytest.param("²", id="superscript-isdigit-but-not-int"),
    pytest.param("1740830400.5", id="fraction"),
    pytest.param("1e9", id="exponent"),
    pytest.param("   ", id="blank"),
]


@pytest.mark.parametrize("stamp", UNREADABLE_TIMESTAMPS)
def test_standard_webhooks_refuses_an_unreadable_timestamp_as_a_bad_signature(stamp: str) -> None:
    body = b"{}"
    headers = standard_webhooks.sign_headers(SW_SECRET, "msg_1", body, timestamp=int(NOW.timestamp()))
    headers[standard_webhooks.TIMESTAMP_HEADER] = stamp
    with pytest.raises(SignatureError, match="webhook-timestamp"):
        standard_webhooks.verify(headers, body, [SW_SECRET], now=NOW.timestamp())


@pytest.mark.parametrize("stamp", UNREADABLE_TIMESTAMPS)
def test_stripe_refuses_an_unreadable_t_as_a_bad_signature(stamp: str) -> None:
    headers = {"Stripe-Signature": f"t={stamp},v1={'0' * 64}"}
    with pytest.raises(SignatureError, match="Stripe-Signature"):
        stripe.PROVIDER.verify(webhook(b"{}", headers, received_at=NOW), ["whsec_x"])


@pytest.mark.parametrize("stamp", UNREADABLE_TIMESTAMPS)
def test_hubspot_refuses_an_unreadable_timestamp_as_a_bad_signature(stamp: str) -> None:
    headers = {"X-HubSpot-Signature-v3": "x", "X-HubSpot-Request-Timestamp": stamp}
    # Milliseconds: 14 digits are read, and then refused as far in the future.
    with pytest.raises(SignatureError, match="X-HubSpot-Request-Timestamp|in the future"):
        hubspot.PROVIDER.verify(webhook(b"[]", headers, received_at=NOW), ["secret"])


def test_a_timestamp_at_the_digit_bound_is_read_and_judged_by_its_age() -> None:
    # Twelve digits is the longest accepted: read, then refused as far in the future, not unreadable.
    with pytest.raises(SignatureError, match="in the future"):
        signing.check_freshness(signing.parse_epoch("9" * 12, "t"), NOW, stripe.SIGNATURE_TOLERANCE)


def test_stripe_refuses_a_created_time_no_datetime_holds_as_malformed() -> None:
    body = json.dumps({"id": "evt_1", "type": "customer.updated", "created": 10**400}).encode()
    with pytest.raises(MalformedWebhookError, match="created is not a timestamp"):
        stripe.PROVIDER.parse(webhook(body, {}, received_at=NOW))


def test_hubspot_refuses_an_occurred_at_no_datetime_holds_as_malformed() -> None:
    event = {"eventId": 1, "portalId": 62515, "occurredAt": 10**400, "subscriptionType": "contact.creation"}
    with pytest.raises(MalformedWebhookError, match="occurredAt is not a timestamp"):
        hubspot.PROVIDER.parse(webhook(json.dumps([event]).encode(), {}, received_at=NOW))
