"""``hubspot/contacts``: contacts of one portal, polled through the CRM search by
``lastmodifieddate`` and kept live by contact webhooks.

HubSpot's events are thin (an id and at most one property) and arrive out of order, so a webhook
fetches the whole contact as it is now and saves that; newest-wins on ``updatedAt`` then orders it
against polled copies. A deletion is stamped with its ``occurredAt``, later than any copy read
before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel

from sync_project.core import (
    Delete,
    FetchContext,
    InboundEvent,
    Page,
    Save,
    SyncDefinition,
    WebhookChange,
    WebhookContext,
    parse_records,
)
from sync_project.providers import hubspot

#: Events after which the contact is re-read; the others remove it.
REFETCH_EVENTS = ("contact.creation", "contact.propertyChange", "contact.restore")
DELETE_EVENTS = ("contact.deletion", "contact.privacyDeletion")


class HubSpotContact(BaseModel):
    id: str
    properties: dict[str, str | None]
    createdAt: datetime
    updatedAt: datetime
    archived: bool = False


def fetch(ctx: FetchContext) -> Iterator[Page]:
    since = ctx.checkpoint.get("since") if ctx.checkpoint else None
    properties = hubspot.contact_properties(ctx.connection)
    pages = hubspot.search_contacts(ctx.client, hubspot.parse_time(since) if since else None, properties)
    for items, resume_at in pages:
        yield Page(
            records=parse_records(HubSpotContact, items, "hubspot contacts search"),
            checkpoint={"since": hubspot.format_time(resume_at)} if resume_at else None,
        )


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    payload = hubspot.HubSpotEvent.model_validate(event.payload)
    occurred = hubspot.format_time(datetime.fromtimestamp(payload.occurredAt / 1000, tz=timezone.utc))
    if event.event_type in DELETE_EVENTS:
        return [Delete({"id": str(payload.objectId), "updatedAt": occurred})]
    if event.event_type == "contact.merge":
        survivor = payload.newObjectId or payload.primaryObjectId
        gone = {*(payload.mergedObjectIds or []), payload.primaryObjectId} - {survivor}
        deleted = sorted(i for i in gone if i is not None)
        return [Delete({"id": str(i), "updatedAt": occurred}) for i in deleted] + _current(ctx, survivor)
    return _current(ctx, payload.objectId)


def _current(ctx: WebhookContext, contact_id: int | None) -> list[WebhookChange]:
    if contact_id is None:
        return []
    contact = hubspot.get_contact(ctx.client, str(contact_id), hubspot.contact_properties(ctx.connection))
    if contact is None:
        # Gone since the event: the tombstone is stamped with when we learned it.
        return [Delete({"id": str(contact_id)})]
    return [Save(HubSpotContact.model_validate(contact))]


contacts = SyncDefinition(
    provider="hubspot",
    name="contacts",
    model=HubSpotContact,
    fetch=fetch,
    description="Contacts of one HubSpot portal.",
    primary_key="id",
    updated_field="updatedAt",
    webhook_events=(*REFETCH_EVENTS, *DELETE_EVENTS, "contact.merge"),
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=15),
)
