"""What a tombstone keeps, written by a webhook run and by a full refresh, on both backends.

Issue 20 reported that a webhook-written tombstone kept only ``{id, updated_at}`` while a full
refresh's kept the last record. These tests drain the sandbox's own delete events through the
sandbox sync's ``on_webhook`` (what a webhook run does) and compare with delete detection: over a
record the store holds, both keep its last content. A delete for a record the store never held has
no last content to keep: the tombstone holds what the delete carries (its id and time), which the
README's merge section says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from sync_project.core import ProviderConnection
from sync_project.core.clock import utcnow
from sync_project.orchestration.webhook_drain import drain_inbox
from sync_project.sandbox.data import ChangeEvent, SandboxState
from sync_project.store import Store
from sync_project.store.inbox import RoutedEvent
from sync_project.syncs.sandbox_contacts import Contact, contacts

LOG = logging.getLogger(__name__)
CONNECTION = "demo-1"
ACCOUNT = "acct-1"


@pytest.fixture
def connection(store: Store) -> ProviderConnection:
    return store.connections.add("sandbox", CONNECTION, account_id=ACCOUNT)


@pytest.fixture
def sandbox() -> Iterator[tuple[SandboxState, list[ChangeEvent]]]:
    events: list[ChangeEvent] = []
    state = SandboxState(seed=7, on_change=events.append)
    state.create_account(ACCOUNT, "token-of-acct-1")
    yield state, events


def deliver_and_drain(store: Store, connection: ProviderConnection, *events: ChangeEvent) -> None:
    """Store the events as the receiver would (routed to the connection), then drain them."""
    store.inbox.receive(
        "sandbox",
        [
            RoutedEvent(
                event_key=e.id,
                event_type=e.type,
                account_id=e.account_id,
                payload=e.as_dict(),
                sync=contacts.key,
                connection_id=CONNECTION,
            )
            for e in events
        ],
    )
    with httpx.Client() as client:  # the sandbox's on_webhook never calls the API
        drained = drain_inbox(store, contacts, connection, client, LOG)
    assert drained.events_done == len(events)


def as_stored(obj: dict[str, object]) -> dict[str, object]:
    return Contact.model_validate(obj).model_dump(mode="json")


def test_a_webhook_delete_keeps_the_last_known_content(
    store: Store, connection: ProviderConnection, sandbox: tuple[SandboxState, list[ChangeEvent]]
) -> None:
    state, events = sandbox
    created = state.create(ACCOUNT, "contacts")
    updated = state.update(ACCOUNT, "contacts", created.data["id"])
    deliver_and_drain(store, connection, created, updated)
    deleted = state.delete(ACCOUNT, "contacts", created.data["id"])
    deliver_and_drain(store, connection, deleted)

    tombstone = store.get(contacts.key, CONNECTION, created.data["id"])
    assert tombstone is not None and tombstone.deleted_at is not None and tombstone.last_action == "deleted"
    assert tombstone.data == as_stored(updated.data)  # the last version, not {id, updated_at}


def test_a_delete_in_the_same_batch_as_the_create_keeps_the_created_content(
    store: Store, connection: ProviderConnection, sandbox: tuple[SandboxState, list[ChangeEvent]]
) -> None:
    state, _ = sandbox
    created = state.create(ACCOUNT, "contacts")
    deleted = state.delete(ACCOUNT, "contacts", created.data["id"])
    deliver_and_drain(store, connection, created, deleted)  # one claim, one transaction

    tombstone = store.get(contacts.key, CONNECTION, created.data["id"])
    assert tombstone is not None and tombstone.deleted_at is not None
    assert tombstone.data == as_stored(created.data)


def test_a_full_refresh_tombstone_keeps_the_same_content_as_a_webhook_one(
    store: Store, connection: ProviderConnection, sandbox: tuple[SandboxState, list[ChangeEvent]]
) -> None:
    state, _ = sandbox
    by_webhook, by_refresh = state.create(ACCOUNT, "contacts"), state.create(ACCOUNT, "contacts")
    deliver_and_drain(store, connection, by_webhook, by_refresh)
    deliver_and_drain(store, connection, state.delete(ACCOUNT, "contacts", by_webhook.data["id"]))
    started_at = utcnow()
    with store.writer(contacts.key, CONNECTION, contacts.record_spec) as writer:
        assert writer.delete_unseen("full-run", started_at) == 1  # by_refresh is absent from the fetch

    for event in (by_webhook, by_refresh):
        tombstone = store.get(contacts.key, CONNECTION, event.data["id"])
        assert tombstone is not None and tombstone.deleted_at is not None
        assert tombstone.data == as_stored(event.data)


def test_a_delete_of_a_record_never_held_keeps_what_the_delete_carries(
    store: Store, connection: ProviderConnection, sandbox: tuple[SandboxState, list[ChangeEvent]]
) -> None:
    """The create's webhook was lost: there is no last content in the store to keep."""
    state, _ = sandbox
    created = state.create(ACCOUNT, "contacts")
    deleted = state.delete(ACCOUNT, "contacts", created.data["id"])
    deliver_and_drain(store, connection, deleted)

    tombstone = store.get(contacts.key, CONNECTION, created.data["id"])
    assert tombstone is not None and tombstone.deleted_at is not None
    assert tombstone.data == {"id": created.data["id"], "updated_at": deleted.occurred_at}
    # ... and it still refuses the lost create, should it arrive late.
    deliver_and_drain(store, connection, created)
    assert store.get(contacts.key, CONNECTION, created.data["id"]).deleted_at is not None
