"""A small paginated API served for real on loopback, with a test provider and sync over it.

It stands in for a provider in the orchestration tests (the sandbox CRM has its own tests): items
with strictly increasing ``updated_at``, keyset pagination by (updated_at, id), and switches to fail
after N pages or to answer garbage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sync_project.core import FetchContext, InboundEvent, Page, Provider, SyncDefinition, WebhookRequest
from sync_project.core.http import json_body, make_client
from sync_project.store import ProviderConnection

PAGE_SIZE = 10
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass
class FakeApi:
    items: dict[str, dict] = field(default_factory=dict)
    #: Answer 500 to every list request after this many successful ones (None: never).
    fail_after_pages: int | None = None
    garbage: bool = False
    pages_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _clock: int = 0
    #: Called with the page number before each list page is answered (lets a test act mid-run).
    on_page: object = None
    #: Set while ``on_page`` runs: the client is then waiting on this API, not on its database.
    answering_page: threading.Event = field(default_factory=threading.Event)
    #: When set, list requests need ``Authorization: Bearer <token>`` (else 401, as APIs answer).
    token: str | None = None

    def put(self, item_id: str, **fields: object) -> dict:
        with self.lock:
            self._clock += 1
            item = {"id": item_id, **self.items.get(item_id, {}), **fields}
            # The wire format pydantic also writes, so stored records compare equal to the API's.
            item["updated_at"] = (EPOCH + timedelta(seconds=self._clock)).isoformat().replace("+00:00", "Z")
            self.items[item_id] = item
            return item

    def remove(self, item_id: str) -> None:
        with self.lock:
            del self.items[item_id]

    def app(self) -> Starlette:
        async def list_items(request: Request) -> Response:
            if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            if self.garbage:
                return PlainTextResponse("<html>upstream proxy error</html>", status_code=200)
            if self.fail_after_pages is not None and self.pages_served >= self.fail_after_pages:
                return PlainTextResponse("internal error", status_code=500)
            if callable(self.on_page):
                self.answering_page.set()
                try:
                    self.on_page(self.pages_served + 1)
                finally:
                    self.answering_page.clear()
            after = request.query_params.get("updated_after", "")
            cursor = request.query_params.get("cursor", "")
            with self.lock:
                ordered = sorted(self.items.values(), key=lambda i: (i["updated_at"], i["id"]))
            rows = [
                i
                for i in ordered
                if i["updated_at"] > after
                and (i["updated_at"], i["id"]) > tuple(cursor.split("|", 1) if cursor else ("", ""))
            ]
            page = rows[:PAGE_SIZE]
            self.pages_served += 1
            next_cursor = f"{page[-1]['updated_at']}|{page[-1]['id']}" if len(rows) > PAGE_SIZE else None
            return JSONResponse({"items": page, "next_cursor": next_cursor})

        return Starlette(routes=[Route("/items", list_items)])


class Item(BaseModel):
    id: str
    name: str = ""
    updated_at: datetime


class FakeProvider(Provider):
    def client(self, connection: ProviderConnection) -> httpx.Client:
        token = connection.credentials()  # resolved by the run, wherever the reference points
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return make_client(connection.config["base_url"], headers=headers, max_attempts=1)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        raise NotImplementedError("the fake API sends no webhooks")

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        raise NotImplementedError("the fake API sends no webhooks")


def fetch_items(ctx: FetchContext) -> Iterator[Page]:
    checkpoint = ctx.checkpoint or {}
    updated_after = checkpoint.get("updated_after", "")
    cursor = checkpoint.get("cursor")
    while True:
        params = {"updated_after": updated_after} | ({"cursor": cursor} if cursor else {})
        body = json_body(ctx.client.get("/items", params=params))
        items = [Item.model_validate(raw) for raw in body["items"]]
        cursor = body["next_cursor"]
        if cursor:
            next_checkpoint = {"updated_after": updated_after, "cursor": cursor}
        else:
            newest = max((raw["updated_at"] for raw in body["items"]), default=updated_after)
            next_checkpoint = {"updated_after": max(newest, updated_after)}
        yield Page(records=items, checkpoint=next_checkpoint)
        if not cursor:
            return


PROVIDER = FakeProvider(name="fakeapi")
ITEMS = SyncDefinition(
    provider="fakeapi",
    name="items",
    model=Item,
    fetch=fetch_items,
    updated_field="updated_at",
    poll_interval=timedelta(minutes=5),
    description="Items of the fake API (tests only).",
)
