"""``stripe/customers``: customers of one Stripe account, listed once, then followed through
``customer.*`` events, polled from ``/v1/events`` and pushed by webhooks.

Why newest-wins holds without a modification time: a Stripe customer has none, so each copy is
stamped in ``updated`` with Stripe's time of the state it shows. An event's copy shows the customer
as of the event: ``updated = event.created``. A listed copy shows it as of some moment after the
listing began: ``updated`` = Stripe's clock (the ``Date`` header) just before the listing's first
read, a lower bound. So a listed copy beats every event it already includes (older) and loses to
every event it may not (newer); each of those is replayed from ``/v1/events`` after the listing,
in order, so the run ends on the newest state whatever the webhooks did meanwhile. Stripe's clock
on both sides means no skew between machines enters the comparison. A deletion is stamped one
second after its event: Stripe never changes a deleted customer, and the second keeps a copy from
the same second from resurrecting it. ``ignore_if_modified_after`` would not do: it compares our
write times, and an out-of-order webhook would overwrite a newer one.

The price: every full refresh restamps each listed customer, so it reports them updated.

Checkpoint: ``since`` (replay events created from then on), ``checked`` (Stripe time of the last
poll: events older than 30 days are gone, so a longer gap asks for a full refresh), and while a
listing is under way ``listing_floor``/``listing_after``, so a run killed mid-listing resumes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sync_project.core import (
    Delete,
    FetchContext,
    InboundEvent,
    Page,
    ProviderError,
    RecordLike,
    Save,
    SyncDefinition,
    WebhookChange,
    WebhookContext,
    parse_records,
)
from sync_project.providers import stripe

#: Margin under Stripe's 30 days of events, for the time a poll itself takes.
REPLAY_HORIZON = stripe.EVENT_RETENTION - timedelta(hours=1)


class StripeCustomer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    object: str = "customer"
    email: str | None = None
    name: str | None = None
    phone: str | None = None
    description: str | None = None
    address: dict[str, Any] | None = None
    shipping: dict[str, Any] | None = None
    balance: int = 0
    currency: str | None = None
    created: int
    delinquent: bool | None = None
    invoice_prefix: str | None = None
    livemode: bool
    metadata: dict[str, str] = {}
    preferred_locales: list[str] = []
    tax_exempt: str | None = None
    #: Stripe time (Unix seconds) of the state this copy shows: see the module docstring.
    updated: int


class Checkpoint(BaseModel):
    since: int
    checked: int
    listing_floor: int | None = None
    listing_after: str | None = None


def fetch(ctx: FetchContext) -> Iterator[Page]:
    now = stripe.stripe_time(ctx.client)
    resumed = _resumed_listing(ctx)
    if resumed is not None:
        cp = resumed  # a full refresh a killed run left mid-listing
    elif ctx.mode == "full" or not ctx.checkpoint:
        cp = Checkpoint(since=now, checked=now, listing_floor=now)
    else:
        try:
            cp = Checkpoint.model_validate(ctx.checkpoint)
        except ValidationError:
            raise ProviderError(
                f"stripe/{ctx.connection.connection_id}: unreadable checkpoint: run a full refresh"
            ) from None
        if now - cp.checked > REPLAY_HORIZON.total_seconds():
            raise ProviderError(
                f"stripe/{ctx.connection.connection_id}: last poll {(now - cp.checked) / 86400:.1f} days ago, "
                "and Stripe keeps events for 30 days: run a full refresh"
            )
    if cp.listing_floor is not None:
        floor = cp.listing_floor
        for customers, has_more in stripe.list_customers(ctx.client, cp.listing_after):
            records = parse_records(StripeCustomer, [{**c, "updated": floor} for c in customers], "stripe customers")
            more = has_more and bool(customers)
            cp = cp.model_copy(
                update={
                    "listing_after": customers[-1]["id"] if more else None,
                    "listing_floor": floor if more else None,
                }
            )
            yield Page(records=records, checkpoint=cp.model_dump())
    for events in stripe.customer_events(ctx.client, cp.since):
        saves, deletes = changes(events)
        cp = cp.model_copy(update={"since": max(cp.since, events[-1]["created"])})
        yield Page(records=saves, deleted=deletes, checkpoint=cp.model_dump())
    yield Page(checkpoint=cp.model_copy(update={"checked": now}).model_dump())


def _resumed_listing(ctx: FetchContext) -> Checkpoint | None:
    if ctx.mode != "full" or not ctx.checkpoint:
        return None
    try:
        cp = Checkpoint.model_validate(ctx.checkpoint)
    except ValidationError:
        return None  # not ours to resume: list from the top
    return cp if cp.listing_floor is not None and cp.listing_after else None


def changes(events: list[dict[str, Any]]) -> tuple[list[RecordLike], list[RecordLike]]:
    """The last change per customer of time-ordered events, as (saves, deletes)."""
    last: dict[str, WebhookChange] = {}
    for event in events:
        for change in to_changes(event):
            record = change.record
            # to_changes saves a StripeCustomer and deletes by a mapping with its id
            last[record.id if isinstance(record, StripeCustomer) else dict(record)["id"]] = change
    saves = [change.record for change in last.values() if isinstance(change, Save)]
    deletes = [change.record for change in last.values() if isinstance(change, Delete)]
    return saves, deletes


def to_changes(event: dict[str, Any]) -> list[WebhookChange]:
    customer = (event.get("data") or {}).get("object")
    if not isinstance(customer, dict) or customer.get("object") != "customer":
        return []
    if event.get("type") == "customer.deleted":
        return [Delete({"id": customer["id"], "updated": event["created"] + 1})]
    return [Save(StripeCustomer.model_validate({**customer, "updated": event["created"]}))]


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    # Snapshot events carry the whole customer: nothing to fetch.
    return to_changes(event.payload)


customers = SyncDefinition(
    provider="stripe",
    name="customers",
    model=StripeCustomer,
    fetch=fetch,
    description="Customers of one Stripe account.",
    primary_key="id",
    updated_field="updated",
    webhook_events=stripe.CUSTOMER_EVENT_TYPES,
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=15),
)
