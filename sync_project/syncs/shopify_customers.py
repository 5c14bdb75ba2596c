"""``shopify/customers``: a shop's customers, polled by ``updated_at_min``, kept live by webhooks."""

from collections.abc import Iterator
from datetime import timedelta

from pydantic import AwareDatetime, BaseModel

from sync_project import core
from sync_project.providers import shopify


class ShopifyCustomer(BaseModel):
    id: int
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    state: str | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime


def fetch(ctx: core.FetchContext) -> Iterator[core.Page]:
    since = (ctx.checkpoint or {}).get("updated_at_min") if ctx.mode == "incremental" else None
    for page, resume in shopify.customer_pages(ctx.client, since):
        records = core.parse_records(ShopifyCustomer, page.items, "shopify customers")
        yield core.Page(records=records, checkpoint={"updated_at_min": resume} if resume else None)


def on_webhook(ctx: core.WebhookContext, event: core.InboundEvent) -> list[core.WebhookChange]:
    if event.event_type == "customers/delete":  # it carries the id but no time: dated when received
        return [core.Delete({"id": event.payload["id"]})]
    return [core.Save(ShopifyCustomer.model_validate(event.payload))]


customers = core.SyncDefinition(
    provider="shopify", name="customers", model=ShopifyCustomer, fetch=fetch, updated_field="updated_at",
    webhook_events=("customers/create", "customers/update", "customers/delete"), on_webhook=on_webhook,
    poll_interval=timedelta(minutes=15), description="Customers of one Shopify shop.",
)  # fmt: skip
