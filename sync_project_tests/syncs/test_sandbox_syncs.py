"""The sandbox syncs against a real sandbox: fetch (full, incremental, resumed), on_webhook, merge."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from sync_project.core import Delete, FetchContext, Page, ProviderConnection, Save, SyncDefinition, WebhookContext
from sync_project.core.http import ProviderAuthError
from sync_project.providers.sandbox import PROVIDER
from sync_project.registry import get_sync
from sync_project.store import Store
from sync_project.syncs.sandbox_contacts import Contact, contacts
from sync_project.syncs.sandbox_deals import Deal, deals
from sync_project_tests.sandbox.support import (  # noqa: F401
    Receiver,
    SandboxFactory,
    make_sandbox,
    receiver,
)

TOKEN = "token-of-acct-1"
LOG = logging.getLogger(__name__)
KIND = {"sandbox/contacts": "contacts", "sandbox/deals": "deals"}


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", TOKEN)

    def make(base_url: str) -> ProviderConnection:
        now = datetime.now(timezone.utc)
        return ProviderConnection(
            provider="sandbox",
            connection_id="demo-1",
            account_id="acct-1",
            credentials_env="TEST_SANDBOX_TOKEN",
            config={"base_url": base_url},
            created_at=now,
            updated_at=now,
        )

    return make


def run_fetch(
    sync: SyncDefinition, conn: ProviderConnection, mode: str, checkpoint: dict[str, Any] | None
) -> list[Page]:
    with PROVIDER.client(conn) as client:
        return list(sync.fetch(FetchContext(client, conn, mode, checkpoint, LOG)))  # type: ignore[arg-type]


def dumped(pages: list[Page]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for page in pages for r in page.records]  # type: ignore[union-attr]


def test_the_syncs_are_registered_as_declared() -> None:
    assert get_sync("sandbox/contacts") is contacts
    assert get_sync("sandbox/deals") is deals
    assert contacts.webhook_events == ("contact.created", "contact.updated", "contact.deleted")
    assert deals.webhook_events == ("deal.created", "deal.updated", "deal.deleted")
    assert contacts.cron == deals.cron == "*/5 * * * *"
    assert contacts.record_spec.strategy.value == "newest_source_wins"


@pytest.mark.parametrize("sync", [contacts, deals], ids=lambda s: s.key)
def test_a_full_fetch_returns_the_truth_exactly(
    make_sandbox: SandboxFactory, connection: Any, sync: SyncDefinition
) -> None:
    server, admin = make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 230, "deals": 205}])
    admin.apply_changes(20)
    stale = {"updated_after": "2999-01-01T00:00:00Z", "cursor": None}
    pages = run_fetch(sync, connection(server.base_url), "full", stale)  # full ignores the checkpoint
    truth = admin.truth("acct-1")[KIND[sync.key]]
    assert len(pages) == 3
    # Byte-for-byte the API's JSON after a round trip through the model.
    assert sorted(dumped(pages), key=lambda r: r["id"]) == truth
    assert [p.checkpoint["cursor"] is None for p in pages] == [False, False, True]  # type: ignore[index]
    assert pages[-1].checkpoint["updated_after"] == max(r["updated_at"] for r in truth)  # type: ignore[index]


def test_an_incremental_fetch_returns_only_what_changed(make_sandbox: SandboxFactory, connection: Any) -> None:
    server, admin = make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 40}])
    conn = connection(server.base_url)
    checkpoint = run_fetch(contacts, conn, "incremental", None)[-1].checkpoint
    events = admin.apply_changes(15, deal_share=0)
    pages = run_fetch(contacts, conn, "incremental", checkpoint)
    live = {c["id"]: c for c in admin.truth("acct-1")["contacts"]}
    expected = {e["object_id"] for e in events} & set(live)
    assert {r["id"]: r for r in dumped(pages)} == {i: live[i] for i in expected}
    # Nothing changed since: the next incremental run is one empty page that keeps the watermark.
    again = run_fetch(contacts, conn, "incremental", pages[-1].checkpoint)
    assert [p.records for p in again] == [[]]
    assert again[0].checkpoint == pages[-1].checkpoint


def test_a_fetch_resumes_from_a_mid_way_checkpoint(make_sandbox: SandboxFactory, connection: Any) -> None:
    server, admin = make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "deals": 250}])
    conn = connection(server.base_url)
    first_pages = run_fetch(deals, conn, "incremental", None)
    resumed = run_fetch(deals, conn, "incremental", first_pages[0].checkpoint)
    assert dumped(resumed) == dumped(first_pages[1:])


def test_a_fetch_with_a_revoked_token_fails_clearly(
    make_sandbox: SandboxFactory, connection: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 1}])
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", "revoked-token")
    with pytest.raises(ProviderAuthError, match=r"GET http://127\.0\.0\.1:\d+/v1/contacts: HTTP 401"):
        run_fetch(contacts, connection(server.base_url), "full", None)


def on_webhook(sync: SyncDefinition, conn: ProviderConnection, delivered: Receiver) -> list[Save | Delete]:
    changes: list[Save | Delete] = []
    with httpx.Client() as client:
        ctx = WebhookContext(client, conn, LOG)
        for received in delivered.received:
            for event in PROVIDER.parse(received.as_request()):
                if sync.subscribes_to(event.event_type):
                    changes.extend(sync.on_webhook(ctx, event))  # type: ignore[misc]
    return changes


def test_on_webhook_saves_the_carried_object_and_tombstones_deletes(
    make_sandbox: SandboxFactory, receiver: Receiver, connection: Any
) -> None:
    server, admin = make_sandbox(
        accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 5, "deals": 5}], webhook_url=receiver.url
    )
    events = admin.apply_changes(30)
    admin.flush()
    conn = connection(server.base_url)
    for sync, model in ((contacts, Contact), (deals, Deal)):
        changes = on_webhook(sync, conn, receiver)
        mine = [e for e in events if sync.subscribes_to(e["type"])]
        assert len(changes) == len(mine)
        for change, event in zip(changes, mine, strict=True):
            if event["type"].endswith(".deleted"):
                assert change == Delete({"id": event["object_id"], "updated_at": event["occurred_at"]})
            else:
                assert isinstance(change, Save) and isinstance(change.record, model)
                assert change.record.id == event["object_id"]  # type: ignore[union-attr]
                assert change.record.model_dump(mode="json")["updated_at"] == event["occurred_at"]  # type: ignore[union-attr]


def test_polling_then_chaotic_webhooks_converge_on_the_truth(
    make_sandbox: SandboxFactory, receiver: Receiver, connection: Any, store: Store
) -> None:
    """A full poll, then duplicated and reordered webhooks merged as they arrive: the store equals the truth."""
    server, admin = make_sandbox(
        accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 30, "deals": 30}],
        webhook_url=receiver.url,
        chaos={"duplicate_pct": 30, "delay_s": 0.3},
        seed=11,
    )
    conn = connection(server.base_url)
    for sync in (contacts, deals):
        with store.writer(sync.key, conn.connection_id, sync.record_spec) as writer:
            for page in run_fetch(sync, conn, "full", None):
                writer.save(page.records)
    admin.apply_changes(60)
    admin.flush()
    truth = admin.truth("acct-1")
    for sync in (contacts, deals):
        for change in on_webhook(sync, conn, receiver):
            with store.writer(sync.key, conn.connection_id, sync.record_spec) as writer:
                (writer.delete if isinstance(change, Delete) else writer.save)([change.record])
        kind = KIND[sync.key]
        frame = store.dataframe(sync.key, conn.connection_id)
        assert sorted(frame["_id"]) == [r["id"] for r in truth[kind]]
        for record in truth[kind]:
            assert store.get(sync.key, conn.connection_id, record["id"]).data == record  # type: ignore[union-attr]
        for deleted_id in truth["deleted"][kind]:
            stored = store.get(sync.key, conn.connection_id, deleted_id)
            assert stored is not None and stored.deleted_at is not None
