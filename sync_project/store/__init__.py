"""The records store: guarded merges, change feed, connections, sync state and inbox.

This package is the store's one public surface: a :class:`Store` (one per database) and the types
its attributes and methods take and return, all named here. Callers reach the store through a
``Store`` (``store.connections``, ``store.inbox``, ``store.leases``, ``store.health``,
``store.forwards()``, ``store.writer(...)``, ...), never through its modules or its engine: those
are private, and an import-linter contract (pyproject.toml) keeps them so.

The names below are loaded on first use (PEP 562): a module that needs only a light one (the
merge vocabulary, the errors) does not import SQLAlchemy and the store's schema with it, so the
code location imports fast and a run pays for the store when it opens one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ProviderConnection": "sync_project.core",
    "Connections": "sync_project.store.connections",
    "DuplicateConnectionError": "sync_project.store.connections",
    "unavailable_as_store_error": "sync_project.store.engine",
    "InvalidBatchError": "sync_project.store.errors",
    "LeaseHeldError": "sync_project.store.errors",
    "LeaseLostError": "sync_project.store.errors",
    "StoreError": "sync_project.store.errors",
    "StoreUnavailableError": "sync_project.store.errors",
    "UnknownConnectionError": "sync_project.store.errors",
    "MAX_PAGE": "sync_project.store.feed",
    "Change": "sync_project.store.feed",
    "ChangeAction": "sync_project.store.feed",
    "ChangePage": "sync_project.store.feed",
    "InvalidCursorError": "sync_project.store.feed",
    "decode_cursor": "sync_project.store.feed",
    "Forward": "sync_project.store.forwards",
    "ForwardStats": "sync_project.store.forwards",
    "Forwards": "sync_project.store.forwards",
    "StartAt": "sync_project.store.forwards",
    "Health": "sync_project.store.health",
    "LastRun": "sync_project.store.health",
    "PartitionBacklog": "sync_project.store.health",
    "PartitionDeadLetters": "sync_project.store.health",
    "DEFAULT_MAX_ATTEMPTS": "sync_project.store.inbox",
    "ClaimedEvent": "sync_project.store.inbox",
    "ConnectionInboxStats": "sync_project.store.inbox",
    "DuePartition": "sync_project.store.inbox",
    "Inbox": "sync_project.store.inbox",
    "InboxEvent": "sync_project.store.inbox",
    "InboxStats": "sync_project.store.inbox",
    "ReceiveResult": "sync_project.store.inbox",
    "RoutedEvent": "sync_project.store.inbox",
    "DEFAULT_TTL_S": "sync_project.store.leases",
    "Lease": "sync_project.store.leases",
    "LeaseKeeper": "sync_project.store.leases",
    "LeaseRole": "sync_project.store.leases",
    "LeaseState": "sync_project.store.leases",
    "Leases": "sync_project.store.leases",
    "Action": "sync_project.store.merge",
    "MergeResult": "sync_project.store.merge",
    "MergeStrategy": "sync_project.store.merge",
    "RecordSpec": "sync_project.store.merge",
    "Step": "sync_project.store.merge",
    "parse_timestamp": "sync_project.store.merge",
    "prepare_batch": "sync_project.store.merge",
    "PreparedBatch": "sync_project.store.records",
    "RecordWriter": "sync_project.store.records",
    "prepare": "sync_project.store.records",
    "RecordsAction": "sync_project.core",
    "ResetResult": "sync_project.store.resets",
    "Resets": "sync_project.store.resets",
    "ConnectionLookup": "sync_project.store.routing",
    "ConnectionSnapshot": "sync_project.store.routing",
    "connections_for": "sync_project.store.routing",
    "FullWindow": "sync_project.store.state",
    "SyncState": "sync_project.store.state",
    "SyncStates": "sync_project.store.state",
    "Store": "sync_project.store.store",
    "DEFAULT_FALLBACK_S": "sync_project.store.wakeup",
    "InboxListener": "sync_project.store.wakeup",
    "InboxWakeup": "sync_project.store.wakeup",
}

__all__ = [
    "Action",
    "Change",
    "ChangeAction",
    "ChangePage",
    "ClaimedEvent",
    "ConnectionInboxStats",
    "ConnectionLookup",
    "ConnectionSnapshot",
    "Connections",
    "DEFAULT_FALLBACK_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TTL_S",
    "DuePartition",
    "DuplicateConnectionError",
    "Forward",
    "ForwardStats",
    "Forwards",
    "FullWindow",
    "Health",
    "Inbox",
    "InboxEvent",
    "InboxListener",
    "InboxStats",
    "InboxWakeup",
    "InvalidBatchError",
    "InvalidCursorError",
    "LastRun",
    "Lease",
    "LeaseHeldError",
    "LeaseKeeper",
    "LeaseLostError",
    "LeaseRole",
    "LeaseState",
    "Leases",
    "MAX_PAGE",
    "MergeResult",
    "MergeStrategy",
    "PartitionBacklog",
    "PartitionDeadLetters",
    "PreparedBatch",
    "ProviderConnection",
    "ReceiveResult",
    "RecordSpec",
    "RecordWriter",
    "RecordsAction",
    "ResetResult",
    "Resets",
    "RoutedEvent",
    "StartAt",
    "Step",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "SyncState",
    "SyncStates",
    "UnknownConnectionError",
    "connections_for",
    "decode_cursor",
    "parse_timestamp",
    "prepare",
    "prepare_batch",
    "unavailable_as_store_error",
]

if TYPE_CHECKING:
    from sync_project.core import ProviderConnection, RecordsAction
    from sync_project.store.connections import Connections, DuplicateConnectionError
    from sync_project.store.engine import unavailable_as_store_error
    from sync_project.store.errors import (
        InvalidBatchError,
        LeaseHeldError,
        LeaseLostError,
        StoreError,
        StoreUnavailableError,
        UnknownConnectionError,
    )
    from sync_project.store.feed import MAX_PAGE, Change, ChangeAction, ChangePage, InvalidCursorError, decode_cursor
    from sync_project.store.forwards import Forward, Forwards, ForwardStats, StartAt
    from sync_project.store.health import Health, LastRun, PartitionBacklog, PartitionDeadLetters
    from sync_project.store.inbox import (
        DEFAULT_MAX_ATTEMPTS,
        ClaimedEvent,
        ConnectionInboxStats,
        DuePartition,
        Inbox,
        InboxEvent,
        InboxStats,
        ReceiveResult,
        RoutedEvent,
    )
    from sync_project.store.leases import DEFAULT_TTL_S, Lease, LeaseKeeper, LeaseRole, Leases, LeaseState
    from sync_project.store.merge import (
        Action,
        MergeResult,
        MergeStrategy,
        RecordSpec,
        Step,
        parse_timestamp,
        prepare_batch,
    )
    from sync_project.store.records import PreparedBatch, RecordWriter, prepare
    from sync_project.store.resets import ResetResult, Resets
    from sync_project.store.routing import ConnectionLookup, ConnectionSnapshot, connections_for
    from sync_project.store.state import FullWindow, SyncState, SyncStates
    from sync_project.store.store import Store
    from sync_project.store.wakeup import DEFAULT_FALLBACK_S, InboxListener, InboxWakeup


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
