"""Contacts of the bundled sandbox CRM: polled by ``updated_after``, kept fresh by webhooks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from pydantic import AwareDatetime, BaseModel

from sync_project.core import FetchContext, InboundEvent, Page, SyncDefinition, WebhookChange, WebhookContext
from sync_project.providers import sandbox


class Contact(BaseModel):
    id: str
    email: str
    first_name: str
    last_name: str
    company: str | None = None
    updated_at: AwareDatetime
    created_at: AwareDatetime


def fetch(ctx: FetchContext) -> Iterator[Page]:
    yield from sandbox.paginate(ctx, "/v1/contacts", Contact)


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    return sandbox.webhook_changes(event, Contact)


contacts = SyncDefinition(
    provider="sandbox",
    name="contacts",
    model=Contact,
    fetch=fetch,
    updated_field="updated_at",
    webhook_events=("contact.created", "contact.updated", "contact.deleted"),
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=5),
    description="Contacts of the sandbox CRM (the demo's stand-in for HubSpot).",
)
