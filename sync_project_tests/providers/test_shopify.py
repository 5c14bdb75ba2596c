"""Shopify (docs/writing-a-provider.md's worked example) against fixtures shaped like the Admin
REST API's documented answers: ``{"customers": [...]}`` pages linked by ``Link: rel="next"``
URLs that carry a ``page_info`` cursor, and webhooks signed with ``X-Shopify-Hmac-Sha256``."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from sync_project.core import Delete, Page, ProviderAuthError, Save, SignatureError
from sync_project.providers.shopify import ShopifyProvider
from sync_project.store import Store
from sync_project.syncs import shopify_customers
from sync_project_tests.providers._support import (
    apply_changes,
    connection,
    epoch,
    fetch_context,
    fixture,
    fixture_bytes,
    json_response,
    merge_pages,
    webhook,
    webhook_context,
)

SHOP = "jsmith-store.myshopify.com"
TOKEN_ENV = "SYNC_TEST_SHOPIFY_TOKEN"
SECRET = "hush-client-secret"
NOW = epoch("2024-10-01T15:30:00Z")  # Shopify's clock in the fake (the Date header)
BASE = f"https://{SHOP}/admin/api/2024-10"


class FakeShopify:
    """``GET /customers.json``: ``limit`` customers a page (ours is small, so three span two pages);
    the next page's URL carries only ``limit`` and an opaque ``page_info``, as Shopify's does."""

    def __init__(self, customers: list[dict[str, Any]], *, page_size: int = 2) -> None:
        self.customers, self.page_size = customers, page_size
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.url.path == "/admin/api/2024-10/customers.json"
        assert request.headers["x-shopify-access-token"] == "shpat_test"
        params = request.url.params
        if "page_info" in params:
            assert set(params) == {"limit", "page_info"}  # Shopify refuses filters beside page_info
            cursor = json.loads(base64.b64decode(params["page_info"]))
            rows, start = self._filtered(cursor["since"]), cursor["start"]
        else:
            rows, start = self._filtered(params.get("updated_at_min")), 0
        size = min(self.page_size, int(params["limit"]))
        chunk, more = rows[start : start + size], len(rows) > start + size
        headers = {}
        if more:
            token = base64.b64encode(
                json.dumps({"since": params.get("updated_at_min"), "start": start + size}).encode()
            )
            headers["Link"] = f'<{BASE}/customers.json?limit={params["limit"]}&page_info={token.decode()}>; rel="next"'
        return json_response(200, {"customers": chunk}, now=NOW, headers=headers)

    def _filtered(self, since: str | None) -> list[dict[str, Any]]:
        floor = datetime.fromisoformat(since) if since else None
        return [c for c in self.customers if floor is None or datetime.fromisoformat(c["updated_at"]) >= floor]


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(TOKEN_ENV, "shpat_test")
    return connection("shopify", account_id=SHOP, credentials_env=TOKEN_ENV)


def signed(body: bytes, *, topic: str, secret: str = SECRET) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {
        "X-Shopify-Topic": topic, "X-Shopify-Hmac-Sha256": digest, "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043", "X-Shopify-API-Version": "2024-10",
    }  # fmt: skip


def test_a_full_poll_follows_the_link_header_and_checkpoints_only_when_done(conn, store: Store) -> None:
    fake = FakeShopify(fixture("shopify/customers.json"))
    with ShopifyProvider(transport=httpx.MockTransport(fake)).client(conn) as client:
        pages = list(shopify_customers.fetch(fetch_context(client, conn, mode="full")))
    assert [len(page.records) for page in pages] == [2, 1]
    assert [page.checkpoint for page in pages] == [None, {"updated_at_min": "2024-10-01T15:29:00+00:00"}]
    assert fake.requests[0].url.params["limit"] == "250" and "updated_at_min" not in fake.requests[0].url.params
    sync = shopify_customers.customers
    assert merge_pages(store, sync, "c1", pages, datetime.now(timezone.utc)).added == 3
    assert store.get(sync.key, "c1", "207119551").data["last_name"] == "Norman"


def test_an_incremental_poll_asks_for_what_changed_since_the_checkpoint(conn) -> None:
    fake = FakeShopify(fixture("shopify/customers.json"))
    checkpoint = {"updated_at_min": "2024-10-01T14:00:00+00:00"}
    with ShopifyProvider(transport=httpx.MockTransport(fake)).client(conn) as client:
        pages = list(shopify_customers.fetch(fetch_context(client, conn, mode="incremental", checkpoint=checkpoint)))
    assert fake.requests[0].url.params["updated_at_min"] == "2024-10-01T14:00:00+00:00"
    assert [record.id for page in pages for record in page.records] == [624081428, 706405506]


def test_webhooks_verify_route_by_shop_and_update_or_tombstone_the_record(conn, store: Store) -> None:
    provider = ShopifyProvider()
    received = datetime.fromtimestamp(NOW, timezone.utc)
    customer = copy.deepcopy(fixture("shopify/customers.json")[1])
    customer.update(first_name="Stephen", updated_at="2024-10-01T11:20:00-04:00")
    update = json.dumps(customer).encode()
    request = webhook(update, signed(update, topic="customers/update"), received_at=received)
    provider.verify(request, ["old-secret", SECRET])  # either secret of a rotation
    with pytest.raises(SignatureError, match="does not match"):
        provider.verify(
            webhook(update + b" ", signed(update, topic="customers/update"), received_at=received), [SECRET]
        )
    with pytest.raises(SignatureError, match="missing X-Shopify-Hmac-Sha256"):
        provider.verify(webhook(update, {"X-Shopify-Topic": "customers/update"}, received_at=received), [SECRET])
    [event] = provider.parse(request)
    assert (event.account_id, event.event_type, event.event_key) == (
        SHOP,
        "customers/update",
        "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
    )

    sync = shopify_customers.customers
    fetched = datetime.now(timezone.utc) - timedelta(minutes=5)
    merge_pages(store, sync, "c1", [Page(records=fixture("shopify/customers.json"))], fetched)
    client = httpx.Client()
    changes = sync.on_webhook(webhook_context(client, conn), event)
    assert [type(change) for change in changes] == [Save]
    assert apply_changes(store, sync, "c1", changes, datetime.now(timezone.utc)).updated == 1
    assert store.get(sync.key, "c1", "624081428").data["first_name"] == "Stephen"

    body = fixture_bytes("shopify/webhook_customers_delete.json")
    [deleted] = provider.parse(webhook(body, signed(body, topic="customers/delete"), received_at=received))
    changes = sync.on_webhook(webhook_context(client, conn), deleted)
    assert [type(change) for change in changes] == [Delete]
    assert apply_changes(store, sync, "c1", changes, datetime.now(timezone.utc)).deleted == 1
    assert store.get(sync.key, "c1", "624081428").deleted_at is not None


def test_a_connection_without_its_shop_or_token_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "shpat_test")
    with pytest.raises(ProviderAuthError, match="--account-id SHOP.myshopify.com"):
        ShopifyProvider().client(connection("shopify", credentials_env=TOKEN_ENV))
