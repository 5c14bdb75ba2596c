"""Stripe: one connection per Stripe account; REST client, customer and event lists, webhooks.

Routing: a Connect event names its connected account (``account: acct_...``), and that is the
account id. Events of the platform's own account carry none; point each such account's endpoint at
``/webhooks/stripe?account=acct_...`` to name it, or leave it unnamed to reach every Stripe
connection (right for a single account). Add the connection with ``--account-id acct_...``.
Signatures are checked against every secret in ``SYNC_STRIPE_WEBHOOK_SECRET`` (one per endpoint,
comma-separated), so separate endpoints per account work side by side.

API calls use the connection's secret or restricted key (read access to customers and events).
A platform reading a connected account sets ``config["stripe_account"]`` (sent as
``Stripe-Account``); ``config["api_version"]`` pins ``Stripe-Version``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from sync_project.core import (
    InboundEvent,
    ListPage,
    MalformedWebhookError,
    Provider,
    ProviderAuthError,
    ProviderConnection,
    ProviderError,
    SignatureError,
    Sleep,
    WebhookRequest,
    cursor_pages,
    epoch_time,
    json_body,
    load_json,
    make_client,
    server_time,
    signing,
)

if TYPE_CHECKING:
    import httpx

SIGNATURE_HEADER = "stripe-signature"
#: stripe-python's ``DEFAULT_TOLERANCE``.
SIGNATURE_TOLERANCE = timedelta(seconds=300)
PAGE_SIZE = 100
CUSTOMER_EVENT_TYPES = ("customer.created", "customer.updated", "customer.deleted")
#: "List events, going back up to 30 days."
EVENT_RETENTION = timedelta(days=30)


class StripeList(BaseModel):
    """Stripe's list envelope: ``{"object": "list", "data": [...], "has_more": ...}``."""

    object: str
    data: list[dict[str, Any]]
    has_more: bool


@dataclass
class StripeProvider(Provider):
    name: str = "stripe"
    webhook_secret_env: str | None = "SYNC_STRIPE_WEBHOOK_SECRET"
    default_base_url: str = "https://api.stripe.com"
    transport: httpx.BaseTransport | None = None
    sleep: Sleep = time.sleep

    def client(self, connection: ProviderConnection) -> httpx.Client:
        key = connection.credentials()
        if not key:
            raise ProviderAuthError(
                f"connection stripe/{connection.connection_id} has no credentials: add it with "
                f"--credentials-env VAR, VAR holding a secret or restricted key"
            )
        headers = {"Authorization": f"Bearer {key}"}
        if connection.config.get("stripe_account"):
            headers["Stripe-Account"] = str(connection.config["stripe_account"])
        if connection.config.get("api_version"):
            headers["Stripe-Version"] = str(connection.config["api_version"])
        base_url = str(connection.config.get("base_url") or self.default_base_url)
        return make_client(base_url, headers=headers, transport=self.transport, sleep=self.sleep)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        """``Stripe-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "{t}.{raw body}")>``; any of
        several ``v1`` values may match (Stripe sends one per active secret while rolling them)."""
        signing.require_secrets(secrets, self.webhook_secret_env)
        header = request.headers.get(SIGNATURE_HEADER)
        if not header:
            raise SignatureError("missing Stripe-Signature header")
        timestamp, signatures = _split_signature_header(header)
        signing.check_freshness(timestamp, request.received_at, SIGNATURE_TOLERANCE)
        signed = f"{timestamp}.".encode() + request.body
        expected = [signing.hmac_sha256(secret, signed).hex() for secret in secrets]
        if not any(signing.matches_any(given, expected) for given in signatures):
            raise SignatureError("no v1 signature in Stripe-Signature matches under any configured secret")

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        event = load_json(request.body)
        if not isinstance(event, dict):
            raise MalformedWebhookError("Stripe delivers one event object per request")
        event_id, event_type, created = event.get("id"), event.get("type"), event.get("created")
        if not isinstance(event_id, str) or not isinstance(event_type, str) or not isinstance(created, int):
            raise MalformedWebhookError("event needs a string id and type and an integer created")
        account = event.get("account")
        if not isinstance(account, str) or not account:
            account = _query_account(request.url)
        return [
            InboundEvent(
                event_key=event_id,
                event_type=event_type,
                account_id=account,
                payload=event,
                occurred_at=epoch_time(created, "event created"),
            )
        ]


def _split_signature_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            timestamp = signing.parse_epoch(value, "Stripe-Signature t=")
        elif key == "v1" and value:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("Stripe-Signature has no t=<timestamp>")
    if not signatures:
        raise SignatureError("Stripe-Signature has no v1 signature")
    return timestamp, signatures


def _query_account(url: str) -> str | None:
    values = parse_qs(urlsplit(url).query).get("account")
    return values[0] if values and values[0] else None


def stripe_time(client: httpx.Client) -> int:
    """Stripe's clock now, from a cheap request's ``Date``: customers carry no modification time,
    so copies are stamped with Stripe's time, never ours (see ``syncs/stripe_customers.py``)."""
    response = client.get("/v1/events", params={"limit": 1, "types[]": list(CUSTOMER_EVENT_TYPES)})
    _list(response)
    now = server_time(response)
    # Without a Date header, our clock a minute early: a stamp too early only re-applies events.
    return int((now or datetime.now(timezone.utc) - timedelta(minutes=1)).timestamp())


def list_customers(client: httpx.Client, starting_after: str | None) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """``GET /v1/customers?limit=100&starting_after=``: pages of ``(customers, has_more)``.

    Newest first by creation; creation never changes, so the ``starting_after`` cursor neither
    skips nor repeats a customer while others change. Deleted customers are not listed.
    """

    def fetch_page(cursor: str | None) -> ListPage:
        params: dict[str, Any] = {"limit": PAGE_SIZE}
        if cursor:
            params["starting_after"] = cursor
        page = _list(client.get("/v1/customers", params=params))
        more = page.has_more and bool(page.data)
        return ListPage(page.data, page.data[-1]["id"] if more else None)

    for page in cursor_pages(fetch_page, starting_after):
        yield page.items, page.next_cursor is not None


def customer_events(client: httpx.Client, since: int) -> Iterator[list[dict[str, Any]]]:
    """Customer events created at or after ``since`` (Unix seconds), oldest first, a page at a time.

    Stripe lists events newest first, and a checkpoint taken in the middle of such a walk would
    claim events older than those not yet read. So: one request for the window; if it holds
    everything, reverse it. Otherwise walk back (``starting_after``) to the window's oldest event,
    then forward from it with ``ending_before``, which returns the events just newer than the
    cursor; each page, reversed, continues the last in time order. Memory stays one page.
    """
    base: dict[str, Any] = {"limit": PAGE_SIZE, "types[]": list(CUSTOMER_EVENT_TYPES)}

    def back(starting_after: str | None) -> ListPage:
        params: dict[str, Any] = {**base, "created[gte]": since}
        if starting_after:
            params["starting_after"] = starting_after
        page = _list(client.get("/v1/events", params=params))
        return ListPage(page.data, page.data[-1]["id"] if page.has_more and page.data else None)

    def forward(ending_before: str | None) -> ListPage:
        page = _list(client.get("/v1/events", params={**base, "ending_before": ending_before}))
        return ListPage(page.data, page.data[0]["id"] if page.has_more and page.data else None)

    walk_back = cursor_pages(back)
    first = next(walk_back)
    if first.next_cursor is None:
        if first.items:
            yield list(reversed(first.items))
        return
    oldest = first.items[-1]
    for page in walk_back:
        oldest = page.items[-1] if page.items else oldest
    pending = [oldest]
    for page in cursor_pages(forward, oldest["id"]):
        if pending or page.items:
            yield pending + list(reversed(page.items))
        pending = []


def _list(response: httpx.Response) -> StripeList:
    body = json_body(response)
    try:
        page = StripeList.model_validate(body)
    except ValidationError:
        raise ProviderError(f"GET {response.request.url.path}: expected a Stripe list object") from None
    if page.object != "list" or not all(isinstance(item.get("id"), str) for item in page.data):
        raise ProviderError(f"GET {response.request.url.path}: expected a Stripe list of objects with ids")
    return page


PROVIDER = StripeProvider()
