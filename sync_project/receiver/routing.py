"""Routing: which inbox rows one verified delivery becomes.

An event becomes one row per (subscribed sync x connection its account routes to). The same
function serves the receiver and, through :func:`sync_project.store.connections_for`,
``inbox replay --status unroutable``, so a replayed event lands where a fresh one would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sync_project.core.provider import InboundEvent, MalformedWebhookError
from sync_project.core.sync import SyncDefinition
from sync_project.store import ConnectionLookup, RoutedEvent, connections_for

#: ``(provider, event_type) -> subscribed syncs``; the registry's by default.
SubscribersFn = Callable[[str, str], Sequence[SyncDefinition]]


class InvalidEventError(MalformedWebhookError):
    """An event the inbox cannot hold (key too long, NUL, payload not JSON, ...): HTTP 400."""


def subscribers_from(syncs: Sequence[SyncDefinition]) -> SubscribersFn:
    """A subscription lookup over an explicit list of syncs (tests, embedding)."""

    def subscribers(provider: str, event_type: str) -> list[SyncDefinition]:
        return [s for s in syncs if s.provider == provider and s.subscribes_to(event_type)]

    return subscribers


def registry_subscribers(provider: str, event_type: str) -> list[SyncDefinition]:
    from sync_project import registry

    return registry.syncs_for_event(provider, event_type)


def account_of(event: InboundEvent) -> Any:
    """The event's account id, integers as text (HubSpot sends numeric portal ids)."""
    return None if event.account_id is None else _text(event.account_id)


def _text(value: Any) -> Any:
    # Only integers are converted: anything else is left for validation to refuse (HTTP 400).
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def route(
    provider: str,
    events: Sequence[InboundEvent],
    connections: ConnectionLookup,
    *,
    subscribers: SubscribersFn = registry_subscribers,
    payloads_json: Sequence[str] | None = None,
) -> list[RoutedEvent]:
    """The inbox rows for ``events`` of ``provider``.

    - no sync subscribes to the event type: one ``ignored`` row (sync '') so the event is on record;
    - no connection has the event's account id: one ``unroutable`` row per subscribed sync, kept
      until ``inbox replay --status unroutable`` finds its connection;
    - otherwise one ``pending`` row per subscribed sync and routed connection (paused ones too:
      their events wait).

    ``payloads_json``, one per event: each payload as the inbox stores it, when the caller has
    serialised it already (the receiver's intake has), so it is not encoded a second time.
    """
    try:
        return _route(provider, events, connections, subscribers, payloads_json)
    except InvalidEventError:
        raise
    except ValueError as error:  # RoutedEvent's checks: the field and the reason
        raise InvalidEventError(f"invalid event: {error}") from None


def _route(
    provider: str,
    events: Sequence[InboundEvent],
    connections: ConnectionLookup,
    subscribers: SubscribersFn,
    payloads_json: Sequence[str] | None,
) -> list[RoutedEvent]:
    routed: list[RoutedEvent] = []
    for index, event in enumerate(events):
        account_id = account_of(event)
        if account_id is not None and not isinstance(account_id, str):
            raise InvalidEventError(f"event {event.event_key!r}: account id is a {type(account_id).__name__}")
        common: dict[str, Any] = {
            "event_key": _text(event.event_key),
            "event_type": event.event_type,
            "account_id": account_id,
            "payload": event.payload,
            "payload_json": payloads_json[index] if payloads_json is not None else "",
        }
        syncs = subscribers(provider, event.event_type)
        if not syncs:
            routed.append(RoutedEvent(**common))
            continue
        targets = connections_for(connections, provider, account_id)
        for sync in syncs:
            if not targets:
                routed.append(RoutedEvent(**common, sync=sync.key))
            for connection in targets:
                routed.append(RoutedEvent(**common, sync=sync.key, connection_id=connection.connection_id))
    return routed
