"""Helpers shared by the provider tests: fixtures, connections, webhook requests, a recording sleep,
and merging fetched pages into a real store."""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from sync_project.core import (
    Delete,
    FetchContext,
    Page,
    ProviderConnection,
    Save,
    SyncDefinition,
    Update,
    WebhookContext,
    WebhookRequest,
)
from sync_project.store import MergeResult, Store

FIXTURES = Path(__file__).parent / "fixtures"
LOG = logging.getLogger("sync_project_tests.providers")


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture(name: str) -> Any:
    return json.loads(fixture_bytes(name))


def connection(
    provider: str,
    *,
    account_id: str | None = None,
    credentials_env: str | None = None,
    config: dict[str, Any] | None = None,
    connection_id: str = "c1",
) -> ProviderConnection:
    now = datetime.now(timezone.utc)
    return ProviderConnection(
        provider=provider,
        connection_id=connection_id,
        account_id=account_id,
        credentials_env=credentials_env,
        config=config or {},
        created_at=now,
        updated_at=now,
    )


def webhook(
    body: bytes, headers: dict[str, str], *, url: str = "https://hooks.example.com/webhooks/x", received_at: datetime
) -> WebhookRequest:
    return WebhookRequest(
        method="POST", url=url, headers={k.lower(): v for k, v in headers.items()}, body=body, received_at=received_at
    )


def http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def json_response(status: int, body: Any, *, now: float, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers={"Date": http_date(now), **(headers or {})})


class Sleeps(list[float]):
    """Records the waits a client asks for instead of waiting them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetch_context(
    client: httpx.Client, conn: ProviderConnection, *, mode: str = "full", checkpoint: dict[str, Any] | None = None
) -> FetchContext:
    return FetchContext(client=client, connection=conn, mode=mode, checkpoint=checkpoint, log=LOG)  # type: ignore[arg-type]


def webhook_context(client: httpx.Client, conn: ProviderConnection) -> WebhookContext:
    return WebhookContext(client=client, connection=conn, log=LOG)


def merge_pages(
    store: Store, sync: SyncDefinition, connection_id: str, pages: Iterable[Page], fetched_at: datetime
) -> MergeResult:
    """Apply fetched pages the way a run does: records saved, reported deletions tombstoned."""
    total = MergeResult()
    for page in pages:
        with store.writer(sync.key, connection_id, sync.record_spec) as writer:
            if page.records:
                total += writer.save(page.records, fetched_at=fetched_at)
            if page.deleted:
                total += writer.delete(page.deleted, fetched_at=fetched_at)
    return total


def apply_changes(
    store: Store,
    sync: SyncDefinition,
    connection_id: str,
    changes: Iterable[Save | Update | Delete],
    fetched_at: datetime,
) -> MergeResult:
    """Apply ``on_webhook`` results one by one, as a webhook run does."""
    total = MergeResult()
    with store.writer(sync.key, connection_id, sync.record_spec) as writer:
        for change in changes:
            if isinstance(change, Save):
                total += writer.save([change.record], fetched_at=fetched_at)
            elif isinstance(change, Update):
                total += writer.update([change.record], fetched_at=fetched_at)
            else:
                total += writer.delete([change.record], fetched_at=fetched_at)
    return total
