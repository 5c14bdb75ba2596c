"""Stripe provider and ``stripe/customers``: the listing and the event replay against a fake of the
list endpoints serving the documented customer and event objects, rate limits, auth errors,
``Stripe-Signature`` verification, parsing and routing, and newest-wins in a real store."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from sync_project.core import Delete, InboundEvent, MalformedWebhookError, Page, Save, SignatureError
from sync_project.core.http import ProviderAuthError, ProviderError
from sync_project.providers.stripe import StripeProvider
from sync_project.syncs import stripe_customers
from sync_project_tests.providers._support import (
    Sleeps,
    apply_changes,
    connection,
    fetch_context,
    fixture,
    fixture_bytes,
    json_response,
    merge_pages,
    webhook,
    webhook_context,
)

KEY_ENV = "SYNC_TEST_STRIPE_KEY"
KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
NOW = 1686090000  # Stripe's clock in the fake, Unix seconds


def event(
    event_id: str, event_type: str, created: int, customer: dict[str, Any], **customer_changes: Any
) -> dict[str, Any]:
    """A customer event in the documented envelope (the fixture's), carrying ``customer``."""
    shaped = copy.deepcopy(fixture("stripe/event_customer_updated.json"))
    shaped.update(id=event_id, type=event_type, created=created)
    shaped["data"] = {"object": {**customer, **customer_changes}}
    return shaped


class FakeStripe:
    """``/v1/customers`` and ``/v1/events`` as Stripe pages them: newest first, exclusive
    ``starting_after``/``ending_before`` cursors, ``has_more``; ``types[]`` and ``created[gte]``
    filter events. Pages are small so a handful of fixtures spans several."""

    def __init__(self, customers: list[dict[str, Any]], events: list[dict[str, Any]], *, page_size: int = 2) -> None:
        self.customers = copy.deepcopy(customers)
        self.events = copy.deepcopy(events)
        self.page_size = page_size
        self.now = NOW
        self.requests: list[httpx.Request] = []
        self.scripted: list[httpx.Response] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.scripted:
            return self.scripted.pop(0)
        params = request.url.params
        if request.url.path == "/v1/customers":
            rows = sorted(self.customers, key=lambda c: (c["created"], c["id"]), reverse=True)
        else:
            assert request.url.path == "/v1/events"
            rows = sorted(self.events, key=lambda e: (e["created"], e["id"]), reverse=True)
            types = params.get_list("types[]")
            rows = [e for e in rows if not types or e["type"] in types]
            if "created[gte]" in params:
                rows = [e for e in rows if e["created"] >= int(params["created[gte]"])]
        size = min(self.page_size, int(params.get("limit", "10")))
        ids = [row["id"] for row in rows]
        if "ending_before" in params:
            if params["ending_before"] not in ids:
                return json_response(404, fixture("stripe/error_resource_missing.json"), now=self.now)
            newer = rows[: ids.index(params["ending_before"])]
            chunk, has_more = newer[-size:], len(newer) > size
        else:
            start = ids.index(params["starting_after"]) + 1 if "starting_after" in params else 0
            chunk, has_more = rows[start : start + size], len(rows) > start + size
        body = {"object": "list", "url": request.url.path, "has_more": has_more, "data": chunk}
        return json_response(200, body, now=self.now)

    def paths(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (r.url.path, {k: r.url.params.get_list(k) if k == "types[]" else v for k, v in r.url.params.items()})
            for r in self.requests
        ]


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return connection("stripe", account_id="acct_1032D82eZvKYlo2C", credentials_env=KEY_ENV)


def run_fetch(
    fake: FakeStripe, conn, *, sleeps: Sleeps | None = None, mode: str = "full", checkpoint=None
) -> list[Page]:
    provider = StripeProvider(transport=httpx.MockTransport(fake), sleep=sleeps if sleeps is not None else Sleeps())
    with provider.client(conn) as client:
        return list(stripe_customers.fetch(fetch_context(client, conn, mode=mode, checkpoint=checkpoint)))


def customers_by_id() -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in fixture("stripe/customers.json")}


def changes_during_listing() -> list[dict[str, Any]]:
    """An update to Jenny after the listing began and a deletion of Edsger, as Stripe records them."""
    return [fixture("stripe/event_customer_updated.json"), fixture("stripe/event_customer_deleted.json")]


# -- full refresh and replay ---------------------------------------------------------------------


def test_a_full_refresh_lists_every_customer_then_replays_the_events_since_it_began(conn) -> None:
    fake = FakeStripe(fixture("stripe/customers.json"), changes_during_listing())
    pages = run_fetch(fake, conn)

    listed = [c for page in pages[:3] for c in page.records]
    assert [c.id for c in listed] == [c["id"] for c in fixture("stripe/customers.json")]
    assert {c.updated for c in listed} == {NOW}, "stamped with Stripe's clock before the first read"
    assert [p.checkpoint.get("listing_after") for p in pages[:3]] == ["cus_NffqZ3XlFzJxZb", "cus_NffoR4hBq2mPdL", None]

    replay = pages[3]
    [jenny] = replay.records
    assert (jenny.id, jenny.email, jenny.updated) == ("cus_NffrFeUfNV2Hib", "jenny.rosen@example.com", 1686090100)
    assert replay.deleted == [{"id": "cus_NffnJ7kYt5sWxE", "updated": 1686090201}]
    assert pages[-1].checkpoint == {"since": 1686090200, "checked": NOW, "listing_floor": None, "listing_after": None}

    event_types = ["customer.created", "customer.updated", "customer.deleted"]
    assert fake.paths() == [
        ("/v1/events", {"limit": "1", "types[]": event_types}),
        ("/v1/customers", {"limit": "100"}),
        ("/v1/customers", {"limit": "100", "starting_after": "cus_NffqZ3XlFzJxZb"}),
        ("/v1/customers", {"limit": "100", "starting_after": "cus_NffoR4hBq2mPdL"}),
        ("/v1/events", {"limit": "100", "types[]": event_types, "created[gte]": str(NOW)}),
    ]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert "stripe-account" not in fake.requests[0].headers


def test_a_listing_killed_midway_resumes_where_it_stopped_with_its_first_floor(conn) -> None:
    fake = FakeStripe(fixture("stripe/customers.json"), [])
    first_page = run_fetch(fake, conn)[0]
    fake.requests.clear()
    fake.now = NOW + 600
    pages = run_fetch(fake, conn, mode="incremental", checkpoint=first_page.checkpoint)
    assert fake.paths()[1] == ("/v1/customers", {"limit": "100", "starting_after": "cus_NffqZ3XlFzJxZb"})
    resumed = [c for page in pages for c in page.records]
    assert [c.id for c in resumed] == [c["id"] for c in fixture("stripe/customers.json")[2:]]
    assert {c.updated for c in resumed} == {NOW}
    assert pages[-1].checkpoint["checked"] == NOW + 600


def test_a_long_event_window_is_replayed_oldest_first_a_page_at_a_time(conn) -> None:
    people = customers_by_id()
    events = [
        event("evt_1", "customer.updated", NOW + 10, people["cus_NffrFeUfNV2Hib"], name="Jenny R."),
        event("evt_2", "customer.updated", NOW + 20, people["cus_NffqZ3XlFzJxZb"], name="Ada L."),
        event("evt_3", "customer.updated", NOW + 30, people["cus_NffrFeUfNV2Hib"], name="Jenny Rosen-Smith"),
        event("evt_4", "customer.deleted", NOW + 40, people["cus_Nffp8vWvQxKc9T"]),
        event("evt_5", "customer.updated", NOW + 50, people["cus_NffoR4hBq2mPdL"], name="A. M. Turing"),
        event("evt_old", "customer.updated", NOW - 500, people["cus_NffoR4hBq2mPdL"], name="too old"),
    ]
    fake = FakeStripe([], events)
    fake.now = NOW + 60
    checkpoint = {"since": NOW, "checked": NOW}
    pages = run_fetch(fake, conn, mode="incremental", checkpoint=checkpoint)

    applied = [(c.id, c.name, c.updated) for page in pages for c in page.records]
    # Jenny's two updates share a page: only the later one is kept.
    assert applied == [
        ("cus_NffrFeUfNV2Hib", "Jenny Rosen-Smith", NOW + 30),
        ("cus_NffqZ3XlFzJxZb", "Ada L.", NOW + 20),
        ("cus_NffoR4hBq2mPdL", "A. M. Turing", NOW + 50),
    ]
    assert [d for page in pages for d in page.deleted] == [{"id": "cus_Nffp8vWvQxKc9T", "updated": NOW + 41}]
    assert [p.checkpoint["since"] for p in pages] == [NOW + 30, NOW + 50, NOW + 50]
    assert pages[-1].checkpoint["checked"] == NOW + 60
    cursors = [
        (params.get("created[gte]"), params.get("starting_after"), params.get("ending_before"))
        for _, params in fake.paths()[1:]
    ]
    assert cursors == [
        (str(NOW), None, None),  # newest first: evt_5, evt_4
        (str(NOW), "evt_4", None),  # evt_3, evt_2
        (str(NOW), "evt_2", None),  # evt_1: the oldest of the window
        (None, None, "evt_1"),  # forward: evt_3, evt_2 (the two just newer)
        (None, None, "evt_3"),  # evt_5, evt_4
    ]


def test_only_the_last_event_of_a_customer_in_a_page_applies() -> None:
    jenny = customers_by_id()["cus_NffrFeUfNV2Hib"]
    saves, deletes = stripe_customers.changes(
        [
            event("evt_a", "customer.updated", NOW + 1, jenny, name="first"),
            event("evt_b", "customer.deleted", NOW + 1, jenny),
        ]
    )
    assert saves == [] and deletes == [{"id": "cus_NffrFeUfNV2Hib", "updated": NOW + 2}]


def test_a_gap_longer_than_stripes_event_retention_asks_for_a_full_refresh(conn) -> None:
    fake = FakeStripe([], [])
    old = NOW - int(timedelta(days=30).total_seconds())
    with pytest.raises(ProviderError, match="Stripe keeps events for 30 days: run a full refresh"):
        run_fetch(fake, conn, mode="incremental", checkpoint={"since": old, "checked": old})


def test_a_connected_account_is_read_through_the_stripe_account_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    conn = connection(
        "stripe",
        account_id="acct_1032D82eZvKYlo2C",
        credentials_env=KEY_ENV,
        config={"stripe_account": "acct_1032D82eZvKYlo2C", "api_version": "2023-10-16"},
    )
    fake = FakeStripe(fixture("stripe/customers.json"), [])
    run_fetch(fake, conn)
    assert {(r.headers["stripe-account"], r.headers["stripe-version"]) for r in fake.requests} == {
        ("acct_1032D82eZvKYlo2C", "2023-10-16")
    }


# -- rate limits and errors ----------------------------------------------------------------------


def test_rate_limit_honours_retry_after(conn) -> None:
    fake = FakeStripe(fixture("stripe/customers.json"), [])
    fake.scripted = [
        json_response(200, {"object": "list", "url": "/v1/events", "has_more": False, "data": []}, now=NOW),
        json_response(429, fixture("stripe/error_rate_limit.json"), now=NOW, headers={"Retry-After": "1"}),
    ]
    sleeps = Sleeps()
    pages = run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [1.0]
    assert fake.paths()[1] == fake.paths()[2] == ("/v1/customers", {"limit": "100"})
    assert len([c for page in pages for c in page.records]) == 5


@pytest.mark.parametrize(
    ("status", "body"), [(401, "stripe/error_invalid_api_key.json"), (403, "stripe/error_permission.json")]
)
def test_auth_failures_raise_a_clear_error(conn, status: int, body: str) -> None:
    fake = FakeStripe([], [])
    fake.scripted = [json_response(status, fixture(body), now=NOW)]
    with pytest.raises(
        ProviderAuthError,
        match=rf"GET https://api.stripe.com/v1/events: HTTP {status}: check the connection's credentials",
    ):
        run_fetch(fake, conn)


def test_a_connection_without_credentials_is_refused() -> None:
    with pytest.raises(ProviderAuthError, match="has no credentials"):
        StripeProvider().client(connection("stripe"))


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, text="<html>upstream timeout</html>"), "response is not JSON"),
        (httpx.Response(200, json={"object": "customer", "id": "cus_1"}), "expected a Stripe list object"),
        (httpx.Response(200, json={"object": "list", "has_more": False, "data": [{"no": "id"}]}), "objects with ids"),
    ],
)
def test_garbage_answers_fail_with_the_cause(conn, response: httpx.Response, expected: str) -> None:
    fake = FakeStripe([], [])
    fake.scripted = [response]
    with pytest.raises(ProviderError, match=expected):
        run_fetch(fake, conn)


# -- webhook signatures --------------------------------------------------------------------------

SECRET = "whsec_5e3f1a2b7c9d4e6f8a0b1c2d3e4f5a6b"
RECEIVED = datetime.fromtimestamp(1686090105, tz=timezone.utc)
PROVIDER = StripeProvider()


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """Stripe's scheme as its docs state it, written out independently of the provider."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signed(body: bytes, *, secret: str = SECRET, timestamp: int = 1686090101) -> dict[str, str]:
    return {"Stripe-Signature": f"t={timestamp},v1={sign(body, secret, timestamp)}"}


def test_a_signed_event_verifies() -> None:
    body = fixture_bytes("stripe/event_customer_updated.json")
    PROVIDER.verify(webhook(body, signed(body), received_at=RECEIVED), [SECRET])


def test_any_v1_signature_under_any_configured_secret_verifies() -> None:
    body = fixture_bytes("stripe/event_customer_updated.json")
    # A non-matching v1 first and a v0 (Stripe's test-mode scheme, ignored) before the match.
    header = ",".join(["t=1686090101", f"v1={'0' * 64}", f"v0={'1' * 64}", f"v1={sign(body, 'whsec_new', 1686090101)}"])
    PROVIDER.verify(webhook(body, {"Stripe-Signature": header}, received_at=RECEIVED), [SECRET, "whsec_new"])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong secret", "no v1 signature in Stripe-Signature matches"),
        ("altered body", "no v1 signature in Stripe-Signature matches"),
        ("altered timestamp", "no v1 signature in Stripe-Signature matches"),
        ("stale timestamp", "301 s old, beyond the 300 s tolerance"),
        ("future timestamp", "301 s in the future, beyond the 300 s tolerance"),
        ("missing header", "missing Stripe-Signature header"),
        ("no timestamp", "has no t=<timestamp>"),
        ("no v1", "has no v1 signature"),
        ("no secret configured", "no webhook secret configured: set SYNC_STRIPE_WEBHOOK_SECRET"),
    ],
)
def test_signatures_that_must_fail(case: str, expected: str) -> None:
    body = fixture_bytes("stripe/event_customer_updated.json")
    headers, received, secrets = signed(body), RECEIVED, [SECRET]
    if case == "wrong secret":
        headers = signed(body, secret="whsec_someone_else")
    elif case == "altered body":
        body = body.replace(b"jenny.rosen@example.com", b"mallory@example.com")
    elif case == "altered timestamp":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].replace("t=1686090101", "t=1686090102")
    elif case == "stale timestamp":
        headers, received = (
            signed(body, timestamp=1686090101),
            datetime.fromtimestamp(1686090101 + 301, tz=timezone.utc),
        )
    elif case == "future timestamp":
        headers, received = (
            signed(body, timestamp=1686090101),
            datetime.fromtimestamp(1686090101 - 301, tz=timezone.utc),
        )
    elif case == "missing header":
        headers = {}
    elif case == "no timestamp":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].split(",", 1)[1]
    elif case == "no v1":
        headers["Stripe-Signature"] = headers["Stripe-Signature"].replace("v1=", "v0=")
    else:
        secrets = []
    with pytest.raises(SignatureError, match=expected):
        PROVIDER.verify(webhook(body, headers, received_at=received), secrets)


# -- parsing and routing -------------------------------------------------------------------------


def test_an_event_is_keyed_by_its_id() -> None:
    body = fixture_bytes("stripe/event_customer_updated.json")
    [parsed] = PROVIDER.parse(webhook(body, {}, url="https://hooks.example.com/webhooks/stripe", received_at=RECEIVED))
    assert (parsed.event_key, parsed.event_type, parsed.account_id) == (
        "evt_1NG8Eb2eZvKYlo2CvTzWq3Xe",
        "customer.updated",
        None,
    )
    assert parsed.occurred_at == datetime.fromtimestamp(1686090100, tz=timezone.utc)


def test_a_connect_event_routes_to_its_connected_account() -> None:
    body = fixture_bytes("stripe/event_customer_updated_connect.json")
    [parsed] = PROVIDER.parse(
        webhook(body, {}, url="https://hooks.example.com/webhooks/stripe?account=acct_other", received_at=RECEIVED)
    )
    assert parsed.account_id == "acct_1032D82eZvKYlo2C", "the event's own account wins over the endpoint's"


def test_an_endpoint_names_its_account_in_the_query() -> None:
    body = fixture_bytes("stripe/event_customer_updated.json")
    url = "https://hooks.example.com/webhooks/stripe?account=acct_1032D82eZvKYlo2C"
    [parsed] = PROVIDER.parse(webhook(body, {}, url=url, received_at=RECEIVED))
    assert parsed.account_id == "acct_1032D82eZvKYlo2C"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff\xfe not json", "body is not JSON"),
        (b"[]", "one event object per request"),
        (b'{"id": "evt_1", "type": "customer.updated"}', "integer created"),
        (json.dumps({"id": 7, "type": "customer.updated", "created": 1}).encode(), "string id and type"),
    ],
)
def test_malformed_events_are_refused(body: bytes, expected: str) -> None:
    with pytest.raises(MalformedWebhookError, match=expected):
        PROVIDER.parse(webhook(body, {}, received_at=RECEIVED))


# -- on_webhook and newest-wins ------------------------------------------------------------------


def inbound(name: str) -> InboundEvent:
    body = fixture_bytes(name)
    return PROVIDER.parse(webhook(body, {}, received_at=RECEIVED))[0]


def handle(conn, name: str):
    return stripe_customers.on_webhook(webhook_context(None, conn), inbound(name))  # type: ignore[arg-type]


def test_webhook_mappings(conn) -> None:
    [created] = handle(conn, "stripe/event_customer_created.json")
    assert isinstance(created, Save) and (created.record.id, created.record.updated) == (
        "cus_O1new0Cust0mr1",
        1686089970,
    )
    [updated] = handle(conn, "stripe/event_customer_updated.json")
    assert isinstance(updated, Save) and updated.record.email == "jenny.rosen@example.com"
    assert handle(conn, "stripe/event_customer_deleted.json") == [
        Delete({"id": "cus_NffnJ7kYt5sWxE", "updated": 1686090201})
    ]


def test_listing_webhooks_and_replay_converge_on_the_newest_state(store, conn) -> None:
    """A listing stamped with Stripe's clock before it read, webhooks late and out of order, and
    the replay: each copy lands only if it is newer than what the store holds."""
    sync = stripe_customers.customers
    at = datetime.fromtimestamp(NOW, tz=timezone.utc)
    fake = FakeStripe(fixture("stripe/customers.json"), changes_during_listing())
    pages = run_fetch(fake, conn)

    # The update webhook (created after the listing began) lands before the listing's pages.
    assert apply_changes(store, sync, "c1", handle(conn, "stripe/event_customer_updated.json"), at).added == 1
    listing = merge_pages(store, sync, "c1", pages[:3], at)
    assert (listing.added, listing.skipped_stale) == (4, 1), "Jenny's listed copy is older than the webhook's"
    # A webhook of a change the listing already includes arrives late: it is older than the listing.
    old = event("evt_0", "customer.updated", NOW - 60, customers_by_id()["cus_NffqZ3XlFzJxZb"], name="Ada (old)")
    assert apply_changes(store, sync, "c1", stripe_customers.to_changes(old), at).skipped_stale == 1
    # The replay re-applies the update (unchanged) and the deletion.
    replay = merge_pages(store, sync, "c1", pages[3:], at)
    assert (replay.unchanged, replay.deleted) == (1, 1)
    # A re-delivered stale listing copy cannot resurrect the deleted customer.
    assert merge_pages(store, sync, "c1", pages[2:3], at).skipped_stale == 1

    assert store.get(sync.key, "c1", "cus_NffrFeUfNV2Hib").data["email"] == "jenny.rosen@example.com"
    assert store.get(sync.key, "c1", "cus_NffqZ3XlFzJxZb").data["name"] == "Ada Lovelace"
    assert store.get(sync.key, "c1", "cus_NffnJ7kYt5sWxE").deleted_at is not None
    assert store.count(sync.key, "c1") == 4


def test_an_unreadable_checkpoint_asks_for_a_full_refresh(conn) -> None:
    with pytest.raises(ProviderError, match="unreadable checkpoint: run a full refresh"):
        run_fetch(FakeStripe([], []), conn, mode="incremental", checkpoint={"cursor": "evt_1"})
