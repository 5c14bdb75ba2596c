"""HubSpot: one connection per portal (HubSpot account); CRM v3 client, contact search, webhooks.

Routing: a webhook event's account id is its ``portalId`` (the Hub ID), so a connection is added
with ``--account-id <Hub ID>``. Its credential is a private app's access token (or an OAuth access
token) with the ``crm.objects.contacts.read`` scope. Webhook signatures use the *app's client
secret* (``SYNC_HUBSPOT_CLIENT_SECRET``), which signs for every portal the app is installed in.

Signature v3 covers the URL HubSpot called. Behind a proxy or a tunnel the receiver sees another
URL, so ``SYNC_HUBSPOT_WEBHOOK_URL`` names the public target URL exactly as configured in HubSpot.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

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
    epoch_time,
    json_body,
    load_json,
    make_client,
    server_time,
    signing,
    time_window_pages,
)

if TYPE_CHECKING:
    import httpx

SIGNATURE_HEADER = "x-hubspot-signature-v3"
TIMESTAMP_HEADER = "x-hubspot-request-timestamp"
WEBHOOK_URL_ENV = "SYNC_HUBSPOT_WEBHOOK_URL"
SIGNATURE_TOLERANCE = timedelta(minutes=5)
SEARCH_PATH = "/crm/v3/objects/contacts/search"
#: The search endpoints' page maximum, and their cap on results per query.
PAGE_SIZE = 200
SEARCH_RESULT_CAP = 10_000
#: "It may take a few moments for newly created or updated CRM objects to appear in search
#: results": checkpoints stay this far behind HubSpot's clock so late-indexed changes are read.
CHECKPOINT_LAG = timedelta(minutes=5)
DEFAULT_PROPERTIES = (
    "email",
    "firstname",
    "lastname",
    "phone",
    "company",
    "lifecyclestage",
    "createdate",
    "lastmodifieddate",
)
#: HubSpot decodes these in the request URI before signing (its v3 validation guide).
_SIGNED_URI_DECODES = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}  # fmt: skip
_ENCODED = re.compile("|".join(_SIGNED_URI_DECODES), re.IGNORECASE)


class HubSpotEvent(BaseModel):
    """One element of a webhook delivery's JSON array (thin: ids and at most one property)."""

    model_config = ConfigDict(extra="allow")
    eventId: int
    subscriptionId: int | None = None
    portalId: int
    appId: int | None = None
    occurredAt: int
    #: HubSpot's docs show the type as ``subscriptionType``; older examples call it ``eventType``.
    subscriptionType: str | None = None
    eventType: str | None = None
    attemptNumber: int | None = None
    objectId: int | None = None
    propertyName: str | None = None
    propertyValue: Any = None
    changeSource: str | None = None
    primaryObjectId: int | None = None
    mergedObjectIds: list[int] | None = None
    newObjectId: int | None = None


@dataclass
class HubSpotProvider(Provider):
    name: str = "hubspot"
    webhook_secret_env: str | None = "SYNC_HUBSPOT_CLIENT_SECRET"
    default_base_url: str = "https://api.hubapi.com"
    transport: httpx.BaseTransport | None = None
    sleep: Sleep = time.sleep

    def client(self, connection: ProviderConnection) -> httpx.Client:
        token = connection.credentials()
        if not token:
            raise ProviderAuthError(
                f"connection hubspot/{connection.connection_id} has no credentials: add it with "
                f"--credentials-env VAR, VAR holding a private app access token"
            )
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        base_url = str(connection.config.get("base_url") or self.default_base_url)
        return make_client(base_url, headers=headers, transport=self.transport, sleep=self.sleep)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        """``X-HubSpot-Signature-v3 = base64(HMAC-SHA256(client secret, method + URI + body +
        X-HubSpot-Request-Timestamp))``, the timestamp in milliseconds and at most 5 minutes off."""
        signing.require_secrets(secrets, self.webhook_secret_env)
        signature = request.headers.get(SIGNATURE_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not signature:
            raise SignatureError("missing X-HubSpot-Signature-v3 header")
        # Milliseconds: three digits more than a timestamp in seconds.
        signed_at_ms = signing.parse_epoch(timestamp, "X-HubSpot-Request-Timestamp", extra_digits=3)
        assert timestamp is not None  # parse_epoch refused a missing one
        signing.check_freshness(signed_at_ms / 1000, request.received_at, SIGNATURE_TOLERANCE)
        uri = signed_uri(os.environ.get(WEBHOOK_URL_ENV) or request.url)
        message = request.method.upper().encode() + uri.encode() + request.body + timestamp.encode()
        expected = [base64.b64encode(signing.hmac_sha256(secret, message)).decode() for secret in secrets]
        if not signing.matches_any(signature, expected):
            raise SignatureError(
                "X-HubSpot-Signature-v3 does not match under any configured client secret "
                f"(signed URI taken as {uri!r}; set {WEBHOOK_URL_ENV} if HubSpot calls another URL)"
            )

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        """Split the delivered array into one event each.

        HubSpot documents ``eventId`` as "not guaranteed to be unique", so the dedupe key adds
        the fields a redelivery repeats unchanged (all but ``attemptNumber``).
        """
        body = load_json(request.body)
        if not isinstance(body, list):
            raise MalformedWebhookError("HubSpot delivers a JSON array of events")
        events = []
        for index, raw in enumerate(body):
            try:
                event = HubSpotEvent.model_validate(raw)
            except ValidationError as error:
                raise MalformedWebhookError(f"event #{index}: {error}") from None
            event_type = event.subscriptionType or event.eventType
            if not event_type:
                raise MalformedWebhookError(f"event #{index} has neither subscriptionType nor eventType")
            key = ":".join(
                str(part if part is not None else "")
                for part in (event.portalId, event.subscriptionId, event.eventId, event.objectId, event.occurredAt)
            )
            events.append(
                InboundEvent(
                    event_key=key,
                    event_type=event_type,
                    account_id=str(event.portalId),
                    payload=raw,
                    occurred_at=epoch_time(event.occurredAt, f"event #{index} occurredAt", millis=True),
                )
            )
        return events


def signed_uri(url: str) -> str:
    """The URI as HubSpot signs it: the listed percent-escapes decoded, nothing else touched."""
    return _ENCODED.sub(lambda match: _SIGNED_URI_DECODES[match.group(0).upper()], url)


def contact_properties(connection: ProviderConnection) -> list[str]:
    """Which contact properties to read: ``config["properties"]`` or a useful default set."""
    configured = connection.config.get("properties")
    properties = list(configured) if configured else list(DEFAULT_PROPERTIES)
    # The cursor is built from lastmodifieddate: it must always come back.
    return properties if "lastmodifieddate" in properties else [*properties, "lastmodifieddate"]


def search_contacts(
    client: httpx.Client, since: datetime | None, properties: list[str]
) -> Iterator[tuple[list[dict[str, Any]], datetime | None]]:
    """Contacts modified at or after ``since``, oldest modification first, one page at a time with
    the checkpoint to resume from.

    ``POST /crm/v3/objects/contacts/search`` filtered ``lastmodifieddate GTE`` (milliseconds),
    sorted ascending, paged by ``paging.next.after``. Each page restarts the query from the newest
    ``lastmodifieddate`` seen (see :func:`~sync_project.core.pagination.time_window_pages`), so ``after`` stays small: the 10,000
    results a query may page through are reached only by more than 10,000 contacts modified in the
    same millisecond, which fails with a clear error rather than HubSpot's bare 400.
    """

    def fetch_page(anchor: datetime | None, after: str | None) -> ListPage:
        body: dict[str, Any] = {
            "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
            "properties": properties,
            "limit": PAGE_SIZE,
        }
        if anchor is not None:
            body["filterGroups"] = [
                {"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": str(to_millis(anchor))}]}
            ]
        if after is not None:
            if int(after) + PAGE_SIZE > SEARCH_RESULT_CAP:
                raise ProviderError(
                    f"more than {SEARCH_RESULT_CAP} contacts share lastmodifieddate {anchor}: "
                    "HubSpot search cannot page past that many results of one query"
                )
            body["after"] = after
        response = client.post(SEARCH_PATH, json=body)
        data = json_body(response)
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or not all(isinstance(item, dict) for item in results):
            raise ProviderError(f"POST {SEARCH_PATH}: expected an object with a results array")
        next_after = ((data.get("paging") or {}).get("next") or {}).get("after")
        return ListPage(results, str(next_after) if next_after is not None else None, server_time(response))

    for page, resume_at in time_window_pages(fetch_page, last_modified, since, lag=CHECKPOINT_LAG):
        yield page.items, resume_at


def get_contact(client: httpx.Client, contact_id: str, properties: list[str]) -> dict[str, Any] | None:
    """``GET /crm/v3/objects/contacts/{id}``; None when HubSpot no longer has it (deleted, merged)."""
    response = client.get(f"/crm/v3/objects/contacts/{contact_id}", params={"properties": ",".join(properties)})
    if response.status_code == 404:
        return None
    contact = json_body(response)
    if not isinstance(contact, dict):
        raise ProviderError(f"GET /crm/v3/objects/contacts/{contact_id}: expected a JSON object")
    return contact


def last_modified(contact: dict[str, Any]) -> datetime:
    """The search's sort key: ``properties.lastmodifieddate``, else ``updatedAt`` (the same value)."""
    value = (contact.get("properties") or {}).get("lastmodifieddate") or contact.get("updatedAt")
    try:
        # A missing value is refused here: None.replace would escape as an AttributeError.
        if not isinstance(value, str):
            raise TypeError(value)
        return parse_time(value)
    except (TypeError, ValueError):
        raise ProviderError(f"contact {contact.get('id')!r} has no readable lastmodifieddate") from None


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


def format_time(value: datetime) -> str:
    """HubSpot's ISO form, milliseconds and ``Z``."""
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_millis(value: datetime) -> int:
    return int(round(value.timestamp() * 1000))


PROVIDER = HubSpotProvider()
