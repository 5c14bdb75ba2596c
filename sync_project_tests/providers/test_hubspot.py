"""HubSpot provider and ``hubspot/contacts``: CRM search paging against a fake of the search endpoint
serving the documented contact objects, rate limits, auth errors, v3 signatures, batch splitting,
and the thin-event mappings that re-read the contact."""

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

from sync_project.core import Delete, InboundEvent, MalformedWebhookError, Page, Save, SignatureError
from sync_project.core.http import ProviderAuthError, ProviderError
from sync_project.providers import hubspot
from sync_project.providers.hubspot import HubSpotProvider
from sync_project.store import StoreError
from sync_project.syncs import hubspot_contacts
from sync_project_tests.providers._support import (
    Sleeps,
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

TOKEN_ENV = "SYNC_TEST_HUBSPOT_TOKEN"
TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"


def millis(text: str) -> int:
    return int(round(epoch(text) * 1000))


class FakeHubSpot:
    """The contacts search as HubSpot answers it (``lastmodifieddate GTE``, sorted ascending, paged
    by ``after`` offsets, small pages) and ``GET /crm/v3/objects/contacts/{id}``."""

    def __init__(
        self, contacts: list[dict[str, Any]], *, page_size: int = 2, now: str = "2025-01-01T00:00:00Z"
    ) -> None:
        self.contacts = copy.deepcopy(contacts)
        self.page_size = page_size
        self.now = epoch(now)
        self.requests: list[httpx.Request] = []
        self.scripted: list[httpx.Response] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.scripted:
            return self.scripted.pop(0)
        if request.method == "GET":
            contact_id = request.url.path.rsplit("/", 1)[-1]
            found = [c for c in self.contacts if c["id"] == contact_id]
            if not found:
                return json_response(404, fixture("hubspot/error_not_found.json"), now=self.now)
            return json_response(200, found[0], now=self.now)
        assert request.url.path == "/crm/v3/objects/contacts/search"
        body = json.loads(request.content)
        rows = sorted(self.contacts, key=lambda c: (millis(c["properties"]["lastmodifieddate"]), c["id"]))
        for group in body.get("filterGroups", []):
            for rule in group["filters"]:
                assert (rule["propertyName"], rule["operator"]) == ("lastmodifieddate", "GTE")
                rows = [c for c in rows if millis(c["properties"]["lastmodifieddate"]) >= int(rule["value"])]
        offset = int(body.get("after", "0"))
        size = min(self.page_size, body.get("limit", 10))
        answer: dict[str, Any] = {"total": len(rows), "results": rows[offset : offset + size]}
        if offset + size < len(rows):
            answer["paging"] = {"next": {"after": str(offset + size), "link": f"?after={offset + size}"}}
        return json_response(200, answer, now=self.now)

    def searches(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.method == "POST"]


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return connection("hubspot", account_id="33", credentials_env=TOKEN_ENV)


def provider_for(fake: FakeHubSpot, sleeps: Sleeps | None = None) -> HubSpotProvider:
    return HubSpotProvider(transport=httpx.MockTransport(fake), sleep=sleeps if sleeps is not None else Sleeps())


def run_fetch(
    fake: FakeHubSpot, conn, *, sleeps: Sleeps | None = None, mode: str = "full", checkpoint=None
) -> list[Page]:
    with provider_for(fake, sleeps).client(conn) as client:
        return list(hubspot_contacts.fetch(fetch_context(client, conn, mode=mode, checkpoint=checkpoint)))


def gte(search: dict[str, Any]) -> str | None:
    groups = search.get("filterGroups")
    return groups[0]["filters"][0]["value"] if groups else None


# -- pagination ----------------------------------------------------------------------------------


def test_search_pages_through_ties_by_after_and_restarts_from_the_newest_modification(conn) -> None:
    fake = FakeHubSpot(fixture("hubspot/contacts.json"))
    pages = run_fetch(fake, conn)

    assert {c.id for page in pages for c in page.records} == {c["id"] for c in fixture("hubspot/contacts.json")}
    tie = str(millis("2024-10-21T21:36:02.961Z"))
    assert [(gte(s), s.get("after")) for s in fake.searches()] == [
        (None, None),
        (tie, None),
        (tie, "2"),
    ]
    for request, search in zip(fake.requests, fake.searches(), strict=True):
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["content-type"] == "application/json"
        assert search["sorts"] == [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}]
        assert search["limit"] == 200
        assert search["properties"] == list(hubspot.DEFAULT_PROPERTIES)
    assert pages[-1].checkpoint == {"since": "2024-11-02T09:30:00.500Z"}


def test_incremental_starts_at_the_checkpoint_and_stays_behind_the_search_index(conn) -> None:
    fake = FakeHubSpot(fixture("hubspot/contacts.json"), now="2024-11-02T09:32:00Z")
    pages = run_fetch(fake, conn, mode="incremental", checkpoint={"since": "2024-10-21T21:36:02.961Z"})
    assert gte(fake.searches()[0]) == str(millis("2024-10-21T21:36:02.961Z"))
    assert {c.id for page in pages for c in page.records} == {
        "57156923994",
        "57156923995",
        "57156923996",
        "61250123001",
    }
    # The newest modification is 2.5 minutes old on HubSpot's clock: resume 5 minutes back.
    assert pages[-1].checkpoint == {"since": "2024-11-02T09:27:00.000Z"}


def test_configured_properties_are_requested_with_lastmodifieddate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    conn = connection(
        "hubspot", account_id="33", credentials_env=TOKEN_ENV, config={"properties": ["email", "jobtitle"]}
    )
    fake = FakeHubSpot(fixture("hubspot/contacts.json"))
    run_fetch(fake, conn)
    assert fake.searches()[0]["properties"] == ["email", "jobtitle", "lastmodifieddate"]


def test_more_ties_than_the_search_can_page_through_fail_clearly(conn) -> None:
    fake = FakeHubSpot([])
    ties = fixture("hubspot/contacts.json")[1:3]
    fake.scripted = [
        json_response(200, {"total": 20000, "results": ties, "paging": {"next": {"after": "2"}}}, now=fake.now),
        json_response(200, {"total": 20000, "results": ties, "paging": {"next": {"after": "9900"}}}, now=fake.now),
    ]
    with pytest.raises(ProviderError, match="more than 10000 contacts share lastmodifieddate"):
        run_fetch(fake, conn)
    assert len(fake.requests) == 2, "the request HubSpot would refuse is never sent"


# -- rate limits and errors ----------------------------------------------------------------------


def test_rate_limit_honours_retry_after(conn) -> None:
    fake = FakeHubSpot(fixture("hubspot/contacts.json"))
    fake.scripted = [
        json_response(429, fixture("hubspot/error_rate_limit.json"), now=fake.now, headers={"Retry-After": "3"})
    ]
    sleeps = Sleeps()
    pages = run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [3.0]
    assert json.loads(fake.requests[0].content) == json.loads(fake.requests[1].content), "the same search, retried"
    assert len({c.id for page in pages for c in page.records}) == 5


def test_rate_limit_without_retry_after_backs_off(conn) -> None:
    fake = FakeHubSpot(fixture("hubspot/contacts.json"))
    limited = json_response(429, fixture("hubspot/error_rate_limit.json"), now=fake.now)
    fake.scripted = [limited, json_response(429, fixture("hubspot/error_rate_limit.json"), now=fake.now)]
    sleeps = Sleeps()
    run_fetch(fake, conn, sleeps=sleeps)
    assert len(sleeps) == 2
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0, "exponential backoff with jitter"


@pytest.mark.parametrize(
    ("status", "body"), [(401, "hubspot/error_unauthorized.json"), (403, "hubspot/error_forbidden.json")]
)
def test_auth_failures_raise_a_clear_error(conn, status: int, body: str) -> None:
    fake = FakeHubSpot([])
    fake.scripted = [json_response(status, fixture(body), now=fake.now)]
    with pytest.raises(
        ProviderAuthError, match=rf"POST https://api.hubapi.com/crm/v3/objects/contacts/search: HTTP {status}"
    ):
        run_fetch(fake, conn)


def test_a_connection_without_credentials_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderAuthError, match="has no credentials"):
        provider_for(FakeHubSpot([])).client(connection("hubspot", account_id="33"))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(StoreError, match=f"environment variable {TOKEN_ENV} is not set"):
        provider_for(FakeHubSpot([])).client(connection("hubspot", account_id="33", credentials_env=TOKEN_ENV))


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, text="<html>Service Unavailable</html>"), "response is not JSON"),
        (httpx.Response(200, json={"results": "nope"}), "expected an object with a results array"),
        (httpx.Response(200, json=[{"id": "1"}]), "expected an object with a results array"),
    ],
)
def test_garbage_answers_fail_with_the_cause(conn, response: httpx.Response, expected: str) -> None:
    fake = FakeHubSpot([])
    fake.scripted = [response]
    with pytest.raises(ProviderError, match=expected):
        run_fetch(fake, conn)


# -- webhook signatures (v3) ---------------------------------------------------------------------

SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
PUBLIC_URL = "https://hooks.example.com/webhooks/hubspot"
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
PROVIDER = HubSpotProvider()


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """The v3 algorithm as HubSpot's guide states it, written out independently of the provider."""
    message = method.encode() + uri.encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def signed(body: bytes, *, secret: str = SECRET, url: str = PUBLIC_URL, at: datetime = NOW) -> dict[str, str]:
    timestamp = str(int(at.timestamp() * 1000))
    return {
        "X-HubSpot-Signature-v3": sign_v3(secret, "POST", url, body, timestamp),
        "X-HubSpot-Request-Timestamp": timestamp,
    }


def test_hubspots_published_test_vector_verifies() -> None:
    # HubSpot's own client library (hubspot-api-python, tests/spec/utils/test_signature.py).
    timestamp = "15000000"
    request = webhook(
        b"{'example_field':'example_value'}",
        {
            "X-HubSpot-Signature-v3": "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw=",
            "X-HubSpot-Request-Timestamp": timestamp,
        },
        url="https://www.example.com/webhook_uri",
        received_at=datetime.fromtimestamp(int(timestamp) / 1000, tz=timezone.utc) + timedelta(seconds=30),
    )
    PROVIDER.verify(request, [SECRET])


def test_a_signed_batch_verifies_under_any_configured_secret() -> None:
    body = fixture_bytes("hubspot/webhook_batch.json")
    request = webhook(body, signed(body, secret="rotated-in"), url=PUBLIC_URL, received_at=NOW + timedelta(seconds=4))
    PROVIDER.verify(request, [SECRET, "rotated-in"])


def test_the_signed_uri_has_the_listed_escapes_decoded() -> None:
    body = fixture_bytes("hubspot/webhook_batch.json")
    called = "https://hooks.example.com/webhooks/hubspot?app=sync%3Aprod&next=%2Fhome%40x"
    signed_as = "https://hooks.example.com/webhooks/hubspot?app=sync:prod&next=/home@x"
    PROVIDER.verify(webhook(body, signed(body, url=signed_as), url=called, received_at=NOW), [SECRET])


def test_the_public_url_setting_replaces_the_url_seen_behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    body = fixture_bytes("hubspot/webhook_batch.json")
    request = webhook(body, signed(body, url=PUBLIC_URL), url="http://127.0.0.1:8000/webhooks/hubspot", received_at=NOW)
    with pytest.raises(SignatureError, match="set SYNC_HUBSPOT_WEBHOOK_URL"):
        PROVIDER.verify(request, [SECRET])
    monkeypatch.setenv("SYNC_HUBSPOT_WEBHOOK_URL", PUBLIC_URL)
    PROVIDER.verify(request, [SECRET])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong secret", "does not match"),
        ("altered body", "does not match"),
        ("other method", "does not match"),
        ("stale timestamp", "s old, beyond the 300 s tolerance"),
        ("future timestamp", "s in the future, beyond the 300 s tolerance"),
        ("missing signature", "missing X-HubSpot-Signature-v3"),
        ("missing timestamp", "missing X-HubSpot-Request-Timestamp"),
        ("timestamp in seconds text", "X-HubSpot-Request-Timestamp is not a Unix timestamp"),
        ("no secret configured", "no webhook secret configured: set SYNC_HUBSPOT_CLIENT_SECRET"),
    ],
)
def test_signatures_that_must_fail(case: str, expected: str) -> None:
    body = fixture_bytes("hubspot/webhook_batch.json")
    headers = signed(body)
    received, secrets, method = NOW, [SECRET], "POST"
    if case == "wrong secret":
        headers = signed(body, secret="not-the-client-secret")
    elif case == "altered body":
        body = body.replace(b'"subscriber"', b'"customer"')
    elif case == "other method":
        method = "PUT"
    elif case == "stale timestamp":
        received = NOW + timedelta(minutes=5, seconds=1)
    elif case == "future timestamp":
        received = NOW - timedelta(minutes=5, seconds=1)
    elif case == "missing signature":
        del headers["X-HubSpot-Signature-v3"]
    elif case == "missing timestamp":
        del headers["X-HubSpot-Request-Timestamp"]
    elif case == "timestamp in seconds text":
        headers["X-HubSpot-Request-Timestamp"] = "1717243200.0"
    else:
        secrets = []
    request = webhook(body, headers, url=PUBLIC_URL, received_at=received)
    request = type(request)(method, request.url, request.headers, request.body, request.received_at)
    with pytest.raises(SignatureError, match=expected):
        PROVIDER.verify(request, secrets)


# -- batch splitting -----------------------------------------------------------------------------


def test_a_batch_splits_into_one_event_each_routed_by_portal() -> None:
    body = fixture_bytes("hubspot/webhook_batch.json")
    events = PROVIDER.parse(webhook(body, signed(body), received_at=NOW))
    assert [(e.event_type, e.account_id) for e in events] == [
        ("contact.propertyChange", "33"),
        ("contact.creation", "33"),
    ]
    assert [e.event_key for e in events] == [
        "33:25:3816279340:1246965:1462216307945",
        "33:22:3816279480:1246978:1462216307945",
    ]
    assert events[0].occurred_at == datetime(2016, 5, 2, 19, 11, 47, 945000, tzinfo=timezone.utc)
    assert events[0].payload == fixture("hubspot/webhook_batch.json")[0]


def test_a_redelivery_has_the_same_keys() -> None:
    batch = fixture("hubspot/webhook_batch.json")
    retry = [dict(event, attemptNumber=1) for event in batch]
    first = PROVIDER.parse(webhook(json.dumps(batch).encode(), {}, received_at=NOW))
    again = PROVIDER.parse(webhook(json.dumps(retry).encode(), {}, received_at=NOW))
    assert [e.event_key for e in first] == [e.event_key for e in again]


def test_the_older_eventType_field_is_accepted() -> None:
    batch = fixture("hubspot/webhook_batch.json")
    for event in batch:
        event["eventType"] = event.pop("subscriptionType")
    events = PROVIDER.parse(webhook(json.dumps(batch).encode(), {}, received_at=NOW))
    assert [e.event_type for e in events] == ["contact.propertyChange", "contact.creation"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"<xml/>", "body is not JSON"),
        (b'{"eventId": 1}', "JSON array of events"),
        (b'[{"eventId": 1, "occurredAt": 1462216307945, "subscriptionType": "contact.creation"}]', "event #0"),
        (b'[{"eventId": 1, "portalId": 33, "occurredAt": 1462216307945}]', "neither subscriptionType nor eventType"),
        (b"[42]", "event #0"),
    ],
)
def test_malformed_batches_are_refused(body: bytes, expected: str) -> None:
    with pytest.raises(MalformedWebhookError, match=expected):
        PROVIDER.parse(webhook(body, {}, received_at=NOW))


# -- on_webhook ----------------------------------------------------------------------------------


def events_of(name: str) -> list[InboundEvent]:
    body = fixture_bytes(name)
    return PROVIDER.parse(webhook(body, {}, received_at=NOW))


def handle(fake: FakeHubSpot, conn, event: InboundEvent):
    with provider_for(fake).client(conn) as client:
        return hubspot_contacts.on_webhook(webhook_context(client, conn), event)


def test_a_property_change_saves_the_contact_as_it_is_now(conn) -> None:
    fake = FakeHubSpot([fixture("hubspot/contact.json")])
    changes = handle(fake, conn, events_of("hubspot/webhook_batch.json")[0])
    assert len(changes) == 1 and isinstance(changes[0], Save)
    contact = changes[0].record
    assert (contact.id, contact.properties["lifecyclestage"]) == ("1246965", "subscriber")
    request = fake.requests[0]
    assert request.url.path == "/crm/v3/objects/contacts/1246965"
    assert request.url.params["properties"] == ",".join(hubspot.DEFAULT_PROPERTIES)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_a_contact_gone_before_its_creation_event_is_handled_is_deleted(conn) -> None:
    fake = FakeHubSpot([])
    assert handle(fake, conn, events_of("hubspot/webhook_batch.json")[1]) == [Delete({"id": "1246978"})]


def test_a_deletion_is_stamped_with_its_occurrence(conn) -> None:
    [event] = events_of("hubspot/webhook_deletion.json")
    assert handle(FakeHubSpot([]), conn, event) == [Delete({"id": "1246965", "updatedAt": "2016-05-02T19:13:20.000Z"})]


def test_a_merge_deletes_the_merged_contact_and_rereads_the_survivor(conn) -> None:
    [event] = events_of("hubspot/webhook_merge.json")
    changes = handle(FakeHubSpot([fixture("hubspot/contact.json")]), conn, event)
    assert changes[0] == Delete({"id": "1246978", "updatedAt": "2016-05-02T19:15:00.000Z"})
    assert isinstance(changes[1], Save) and changes[1].record.id == "1246965"


def test_a_thin_event_out_of_order_cannot_regress_a_newer_polled_copy(store, conn) -> None:
    sync = hubspot_contacts.contacts
    newer = dict(fixture("hubspot/contact.json"), updatedAt="2016-05-03T08:00:00.000Z")
    newer["properties"] = dict(
        newer["properties"], lastmodifieddate="2016-05-03T08:00:00.000Z", lifecyclestage="customer"
    )
    polled = merge_pages(
        store, sync, "c1", [Page(records=[hubspot_contacts.HubSpotContact.model_validate(newer)])], NOW
    )
    assert polled.added == 1
    # A late event whose re-read hit a stale replica: its copy is older than the stored one.
    changes = handle(FakeHubSpot([fixture("hubspot/contact.json")]), conn, events_of("hubspot/webhook_batch.json")[0])
    assert apply_changes(store, sync, "c1", changes, NOW + timedelta(seconds=5)).skipped_stale == 1
    assert store.get(sync.key, "c1", "1246965").data["properties"]["lifecyclestage"] == "customer"
    [deletion] = events_of("hubspot/webhook_deletion.json")
    assert apply_changes(store, sync, "c1", handle(FakeHubSpot([]), conn, deletion), NOW).skipped_stale == 1, (
        "a deletion that occurred before the stored copy was modified is older than it"
    )
