"""Shopify: one connection per shop; Admin REST customers, ``Link`` pagination, HMAC webhooks.
A connection's account id is its shop's domain (``SHOP.myshopify.com``, the webhooks'
``X-Shopify-Shop-Domain``); its credential an Admin API access token with ``read_customers``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sync_project import core

if TYPE_CHECKING:
    import httpx

API_VERSION = "2024-10"
PAGE_SIZE = 250  # the largest limit the REST Admin API accepts
CHECKPOINT_LAG = timedelta(minutes=1)  # an edit during a walk may be listed by neither it nor the next


@dataclass
class ShopifyProvider(core.Provider):
    name: str = "shopify"
    webhook_secret_env: str | None = "SYNC_SHOPIFY_WEBHOOK_SECRET"  # the app's client secret
    transport: httpx.BaseTransport | None = None  # tests serve fixtures through it

    def client(self, connection: core.ProviderConnection) -> httpx.Client:
        token, shop = connection.credentials(), connection.account_id
        if not token or not shop:
            raise core.ProviderAuthError(
                f"connection shopify/{connection.connection_id} needs --account-id SHOP.myshopify.com "
                "and --credentials-env VAR, VAR holding an Admin API access token"
            )
        base_url = connection.config.get("base_url") or f"https://{shop}/admin/api/{API_VERSION}"
        return core.make_client(str(base_url), headers={"X-Shopify-Access-Token": token}, transport=self.transport)

    def verify(self, request: core.WebhookRequest, secrets: list[str]) -> None:
        """``X-Shopify-Hmac-Sha256: base64(HMAC-SHA256(secret, raw body))``; no timestamp is signed,
        so a replay is caught by its delivery id (the inbox stores each once)."""
        core.signing.require_secrets(secrets, self.webhook_secret_env)
        given = request.headers.get("x-shopify-hmac-sha256")
        if not given:
            raise core.SignatureError("missing X-Shopify-Hmac-Sha256 header")
        expected = [base64.b64encode(core.signing.hmac_sha256(key, request.body)).decode() for key in secrets]
        if not core.signing.matches_any(given, expected):
            raise core.SignatureError("X-Shopify-Hmac-Sha256 does not match the body under any configured secret")

    def parse(self, request: core.WebhookRequest) -> list[core.InboundEvent]:
        topic, delivery = request.headers.get("x-shopify-topic"), request.headers.get("x-shopify-webhook-id")
        if not topic or not delivery:
            raise core.MalformedWebhookError("missing X-Shopify-Topic or X-Shopify-Webhook-Id header")
        payload = core.load_json(request.body)
        if not isinstance(payload, dict):
            raise core.MalformedWebhookError("Shopify delivers one JSON object per request")
        shop = request.headers.get("x-shopify-shop-domain") or None
        return [core.InboundEvent(event_key=delivery, event_type=topic, account_id=shop, payload=payload)]


def customer_pages(client: httpx.Client, updated_at_min: str | None) -> Iterator[tuple[core.ListPage, str | None]]:
    """``GET /customers.json?limit=250[&updated_at_min=]``, then each ``Link: rel="next"`` URL. The
    list is not sorted by ``updated_at``, so only the last page carries the next ``updated_at_min``:
    Shopify's clock when the walk began, less the lag."""
    params: dict[str, Any] = {"limit": PAGE_SIZE, **({"updated_at_min": updated_at_min} if updated_at_min else {})}
    started: datetime | None = None
    for page in core.link_pages(client, "/customers.json", params, _customers):
        started = started or page.server_time
        resume = (started or core.utcnow()) - CHECKPOINT_LAG
        yield page, None if page.next_cursor else resume.isoformat(timespec="seconds")


def _customers(response: httpx.Response) -> list[dict[str, Any]]:
    body = core.json_body(response)
    items = body.get("customers") if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise core.ProviderError(f"GET {response.request.url.path}: expected an object with a customers array")
    return items


PROVIDER = ShopifyProvider()
