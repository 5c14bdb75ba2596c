"""Deals of the bundled sandbox CRM; ``contact_id`` joins them to ``sandbox/contacts``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

from pydantic import AwareDatetime, BaseModel

from sync_project.core import FetchContext, InboundEvent, Page, SyncDefinition, WebhookChange, WebhookContext
from sync_project.providers import sandbox


class Deal(BaseModel):
    id: str
    name: str
    amount: float
    #: HubSpot's default pipeline stage ids (appointmentscheduled ... closedwon, closedlost).
    stage: str
    contact_id: str | None = None
    updated_at: AwareDatetime
    created_at: AwareDatetime


def fetch(ctx: FetchContext) -> Iterator[Page]:
    yield from sandbox.paginate(ctx, "/v1/deals", Deal)


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    return sandbox.webhook_changes(event, Deal)


deals = SyncDefinition(
    provider="sandbox",
    name="deals",
    model=Deal,
    fetch=fetch,
    updated_field="updated_at",
    webhook_events=("deal.created", "deal.updated", "deal.deleted"),
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=5),
    description="Deals of the sandbox CRM, each linked to a contact by contact_id.",
)
