"""The bundled sandbox CRM as a provider: API client, pagination, Standard Webhooks intake.

A connection's ``config["base_url"]`` says where the sandbox runs (else ``SYNC_SANDBOX_URL``, else
the CLI's default address); its ``credentials_env`` names the variable holding the account's API
token. The sync modules (``syncs/sandbox_*.py``) only declare a model and call :func:`paginate` and
:func:`webhook_changes` from here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from sync_project.core import (
    Delete,
    FetchContext,
    InboundEvent,
    ListPage,
    MalformedWebhookError,
    Page,
    Provider,
    ProviderAuthError,
    ProviderConnection,
    ProviderError,
    Save,
    WebhookChange,
    WebhookRequest,
    cursor_pages,
    json_body,
    make_client,
    standard_webhooks,
)

if TYPE_CHECKING:
    import httpx

URL_ENV = "SYNC_SANDBOX_URL"
DEFAULT_URL = "http://127.0.0.1:8765"
PAGE_SIZE = 100


class _ListResponse(BaseModel):
    results: list[dict[str, Any]]
    next_cursor: str | None = None


class _WebhookBody(BaseModel):
    """The envelope of every sandbox webhook; ``data`` is the whole object after the change."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: str
    account_id: str
    occurred_at: AwareDatetime
    data: dict[str, Any]


class SandboxProvider(Provider):
    def client(self, connection: ProviderConnection) -> httpx.Client:
        base_url = connection.config.get("base_url") or os.environ.get(URL_ENV) or self.default_base_url
        token = connection.credentials()
        if not token:
            raise ProviderAuthError(
                f"connection sandbox/{connection.connection_id} has no credentials_env; "
                "the sandbox API needs the account's bearer token"
            )
        return make_client(str(base_url), headers={"authorization": f"Bearer {token}"})

    def check_secrets(self, secrets: list[str]) -> None:
        for secret in secrets:
            standard_webhooks.decode_secret(secret)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        standard_webhooks.verify(request.headers, request.body, secrets, now=request.received_at.timestamp())

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        event_key = request.headers.get(standard_webhooks.ID_HEADER)
        if not event_key:
            raise MalformedWebhookError(f"missing {standard_webhooks.ID_HEADER} header")
        try:
            payload = json.loads(request.body)
            body = _WebhookBody.model_validate(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MalformedWebhookError("body is not JSON") from None
        except ValidationError as error:
            raise MalformedWebhookError(f"not a sandbox event: {_summary(error)}") from None
        return [
            InboundEvent(
                event_key=event_key,
                event_type=body.type,
                account_id=body.account_id,
                payload=payload,
                occurred_at=body.occurred_at,
            )
        ]


PROVIDER = SandboxProvider(
    name="sandbox", webhook_secret_env="SYNC_SANDBOX_WEBHOOK_SECRET", default_base_url=DEFAULT_URL
)


def paginate(ctx: FetchContext, path: str, model: type[BaseModel], *, page_size: int = PAGE_SIZE) -> Iterator[Page]:
    """Pages of ``path`` in ``(updated_at, id)`` order, each with the checkpoint to resume after it.

    The checkpoint is ``{"updated_after": <newest updated_at seen>, "cursor": <next page or None>}``:
    a run that stops mid-way resumes at ``cursor``; the next incremental run asks for what changed
    after ``updated_after``. A full refresh starts from the top, or, resuming one that a killed
    run left open, at that refresh's own checkpoint's ``cursor``.
    """
    start = ctx.checkpoint or {}
    if ctx.mode == "full" and not start.get("cursor"):
        start = {}
    updated_after: str | None = start.get("updated_after")

    def fetch_page(cursor: str | None) -> ListPage:
        params: dict[str, Any] = {"limit": page_size}
        if cursor:
            params["cursor"] = cursor
        elif updated_after:
            params["updated_after"] = updated_after
        try:
            listing = _ListResponse.model_validate(json_body(ctx.client.get(path, params=params)))
        except ValidationError as error:
            raise ProviderError(f"GET {path}: unexpected response: {_summary(error)}") from None
        return ListPage(listing.results, listing.next_cursor)

    for page in cursor_pages(fetch_page, start.get("cursor")):
        try:
            records = [model.model_validate(item) for item in page.items]
        except ValidationError as error:
            raise ProviderError(f"GET {path}: unexpected response: {_summary(error)}") from None
        if page.items:
            updated_after = page.items[-1]["updated_at"]
        yield Page(records=records, checkpoint={"updated_after": updated_after, "cursor": page.next_cursor})


def webhook_changes(event: InboundEvent, model: type[BaseModel]) -> list[WebhookChange]:
    """``*.created``/``*.updated`` save the object the event carries; ``*.deleted`` tombstones it.

    The tombstone is stamped with the event's time, which is later than the object's last update,
    so a delayed copy of an older update cannot bring the record back.
    """
    data = event.payload["data"]
    if event.event_type.endswith(".deleted"):
        deleted_at = event.payload.get("occurred_at") or data["updated_at"]
        return [Delete({"id": data["id"], "updated_at": deleted_at})]
    return [Save(model.model_validate(data))]


def _summary(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:3])
