"""The sandbox provider: Standard Webhooks verification vectors, parsing, and its API client."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from sync_project.core import ProviderConnection, standard_webhooks
from sync_project.core.http import ProviderAuthError, json_body
from sync_project.core.provider import MalformedWebhookError, SignatureError, WebhookRequest
from sync_project.providers.sandbox import DEFAULT_URL, PROVIDER, URL_ENV
from sync_project.registry import get_provider
from sync_project.store import StoreError
from sync_project_tests.sandbox.support import SandboxFactory, make_sandbox  # noqa: F401

# The reference vector published with the Standard Webhooks spec (and used by the svix libraries).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

SECRET = "whsec_" + "c2FuZGJveC1zZWNyZXQtZm9yLXRlc3Rz"  # base64 of "sandbox-secret-for-tests"
OTHER_SECRET = standard_webhooks.generate_secret()
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
EVENT = {
    "id": "evt_1",
    "type": "contact.updated",
    "account_id": "acct-1",
    "occurred_at": "2025-03-01T11:59:59.123456Z",
    "data": {"id": "con_000001", "email": "ada@acme.test", "updated_at": "2025-03-01T11:59:59.123456Z"},
}


def delivery(
    body: bytes | None = None,
    *,
    secret: str = SECRET,
    sent_at: datetime = NOW,
    received_at: datetime = NOW,
    msg_id: str = "evt_1",
    drop: str | None = None,
    **override: str,
) -> WebhookRequest:
    raw = json.dumps(EVENT).encode() if body is None else body
    headers = standard_webhooks.sign_headers(secret, msg_id, raw, timestamp=int(sent_at.timestamp()))
    headers.update(override)
    if drop:
        del headers[drop]
    return WebhookRequest("POST", "http://127.0.0.1/webhooks/sandbox", headers, raw, received_at)


def test_signing_reproduces_the_spec_vector() -> None:
    headers = standard_webhooks.sign_headers(SPEC_SECRET, SPEC_ID, SPEC_BODY, timestamp=SPEC_TIMESTAMP)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    assert standard_webhooks.verify(headers, SPEC_BODY, [SPEC_SECRET], now=SPEC_TIMESTAMP) == SPEC_ID
    # The prefix is optional, as in the reference libraries.
    assert standard_webhooks.verify(headers, SPEC_BODY, [SPEC_SECRET[6:]], now=SPEC_TIMESTAMP) == SPEC_ID


def test_a_valid_delivery_verifies() -> None:
    PROVIDER.verify(delivery(), [SECRET])


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (delivery(secret=OTHER_SECRET), "no signature matches"),
        (delivery(sent_at=NOW - timedelta(seconds=301)), "301 s old"),
        (delivery(sent_at=NOW + timedelta(seconds=301)), "301 s in the future"),
        (delivery(drop="webhook-signature"), "missing header(s): webhook-signature"),
        (delivery(drop="webhook-id"), "missing header(s): webhook-id"),
        (delivery(drop="webhook-timestamp"), "missing header(s): webhook-timestamp"),
        (delivery(**{"webhook-timestamp": "noon"}), "not a Unix timestamp"),
        (delivery(**{"webhook-id": "evt_2"}), "no signature matches"),
        (delivery(**{"webhook-signature": "v1a,abc v2,def"}), "no v1 signature"),
        (delivery(**{"webhook-signature": "v1,bm90IGEgc2lnbmF0dXJl"}), "no signature matches"),
    ],
    ids=[
        "wrong-secret",
        "stale",
        "future",
        "no-signature",
        "no-id",
        "no-timestamp",
        "bad-timestamp",
        "other-id",
        "no-v1",
        "forged",
    ],
)
def test_bad_deliveries_are_refused_with_a_reason(request_: WebhookRequest, message: str) -> None:
    with pytest.raises(SignatureError) as raised:
        PROVIDER.verify(request_, [SECRET])
    assert message in str(raised.value)


def test_an_altered_body_fails_verification() -> None:
    signed = delivery()
    altered = WebhookRequest(
        signed.method, signed.url, signed.headers, signed.body.replace(b"acct-1", b"acct-2"), signed.received_at
    )
    with pytest.raises(SignatureError, match="no signature matches"):
        PROVIDER.verify(altered, [SECRET])


def test_the_tolerance_is_five_minutes_both_ways() -> None:
    PROVIDER.verify(delivery(sent_at=NOW - timedelta(seconds=300)), [SECRET])
    PROVIDER.verify(delivery(sent_at=NOW + timedelta(seconds=300)), [SECRET])


def test_any_of_several_signatures_and_several_secrets_may_match() -> None:
    rotated = delivery(secret=OTHER_SECRET)
    both = f"v1,bm90IGEgc2lnbmF0dXJl {rotated.headers['webhook-signature']}"
    PROVIDER.verify(delivery(**{"webhook-signature": both}, secret=OTHER_SECRET), [OTHER_SECRET])
    PROVIDER.verify(rotated, [SECRET, OTHER_SECRET])


def test_without_secrets_nothing_verifies_and_a_bad_secret_is_a_configuration_error() -> None:
    with pytest.raises(SignatureError, match="no webhook secret is configured"):
        PROVIDER.verify(delivery(), [])
    with pytest.raises(standard_webhooks.WebhookSecretError, match="not whsec_ followed by base64"):
        PROVIDER.verify(delivery(), ["whsec_not base64!"])
    with pytest.raises(standard_webhooks.WebhookSecretError, match="empty"):
        standard_webhooks.decode_secret("whsec_")


def test_an_unpadded_secret_verifies_as_the_reference_library_reads_it() -> None:
    """The spec vector's secret has no padding; one whose base64 needs it, shown without, works
    too (the reference library pads before decoding). A length no padding can fix does not."""
    padded = "whsec_" + "c2FuZGJveC1zZWNyZXQ="  # base64 of "sandbox-secret"
    unpadded = padded.rstrip("=")
    assert standard_webhooks.decode_secret(unpadded) == standard_webhooks.decode_secret(padded) == b"sandbox-secret"
    PROVIDER.verify(delivery(secret=padded), [unpadded])
    PROVIDER.check_secrets([unpadded, padded])
    with pytest.raises(standard_webhooks.WebhookSecretError, match="not whsec_ followed by base64"):
        PROVIDER.check_secrets(["whsec_c2FuZ"])


def test_secrets_come_from_the_declared_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_provider("sandbox") is PROVIDER
    assert PROVIDER.webhook_secret_env == "SYNC_SANDBOX_WEBHOOK_SECRET"
    monkeypatch.setenv("SYNC_SANDBOX_WEBHOOK_SECRET", f"{SECRET}, {OTHER_SECRET}")
    assert PROVIDER.webhook_secrets() == [SECRET, OTHER_SECRET]


def test_parse_gives_one_event_keyed_by_the_webhook_id() -> None:
    (event,) = PROVIDER.parse(delivery(msg_id="evt_1"))
    assert event.event_key == "evt_1"
    assert event.event_type == "contact.updated"
    assert event.account_id == "acct-1"
    assert event.payload == EVENT
    assert event.occurred_at == datetime(2025, 3, 1, 11, 59, 59, 123456, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body is not JSON"),
        (b"\xff\xfe", "body is not JSON"),
        (b"[1, 2]", "not a sandbox event"),
        (json.dumps({k: v for k, v in EVENT.items() if k != "type"}).encode(), "type: Field required"),
        (json.dumps({**EVENT, "data": "con_1"}).encode(), "data: Input should be a valid dictionary"),
        (json.dumps({**EVENT, "occurred_at": "soon"}).encode(), "occurred_at"),
    ],
    ids=["garbage", "binary", "array", "no-type", "data-not-object", "bad-time"],
)
def test_malformed_bodies_are_refused_with_a_reason(body: bytes, message: str) -> None:
    with pytest.raises(MalformedWebhookError) as raised:
        PROVIDER.parse(delivery(body))
    assert message in str(raised.value)


def test_parse_needs_the_webhook_id_header() -> None:
    with pytest.raises(MalformedWebhookError, match="missing webhook-id"):
        PROVIDER.parse(delivery(drop="webhook-id"))


def connection(**fields: Any) -> ProviderConnection:
    now = datetime.now(timezone.utc)
    values: dict[str, Any] = {
        "provider": "sandbox",
        "connection_id": "c1",
        "account_id": "acct-1",
        "credentials_env": "TEST_SANDBOX_TOKEN",
        "created_at": now,
        "updated_at": now,
    }
    return ProviderConnection.model_validate({**values, **fields})


def test_the_client_talks_to_the_connection_account(
    make_sandbox: SandboxFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, admin = make_sandbox(accounts=[{"account_id": "acct-1", "token": "token-of-acct-1", "contacts": 2}])
    _, token_2 = admin.create_account("acct-2", contacts=1)
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", "token-of-acct-1")
    monkeypatch.setenv("TEST_SANDBOX_TOKEN_2", token_2)
    with PROVIDER.client(connection(config={"base_url": server.base_url})) as client:
        assert json_body(client.get("/v1/account")) == {"account_id": "acct-1"}
        assert len(json_body(client.get("/v1/contacts"))["results"]) == 2
    monkeypatch.setenv(URL_ENV, server.base_url)  # the fallback when the connection names no URL
    with PROVIDER.client(connection(credentials_env="TEST_SANDBOX_TOKEN_2")) as client:
        assert json_body(client.get("/v1/account")) == {"account_id": "acct-2"}
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", "revoked-token")
    with PROVIDER.client(connection()) as client, pytest.raises(ProviderAuthError, match="HTTP 401"):
        json_body(client.get("/v1/contacts"))


def test_the_client_base_url_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", "token-of-acct-1")
    with PROVIDER.client(connection()) as client:
        assert str(client.base_url).rstrip("/") == DEFAULT_URL
        assert client.headers["authorization"] == "Bearer token-of-acct-1"


def test_the_client_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProviderAuthError, match="has no credentials_env"):
        PROVIDER.client(connection(credentials_env=None))
    monkeypatch.delenv("TEST_SANDBOX_TOKEN", raising=False)
    with pytest.raises(StoreError, match="TEST_SANDBOX_TOKEN is not set"):
        PROVIDER.client(connection())
