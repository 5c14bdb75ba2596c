"""The records store: guarded merges, change feed, connections, sync state and inbox.

The names below are loaded on first use (PEP 562): a module that needs only a light one (the
merge vocabulary, the errors) does not import SQLAlchemy and the store's schema with it, so the
code location imports fast and a run pays for the store when it opens one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ProviderConnection": "sync_project.core",
    "InvalidBatchError": "sync_project.store.errors",
    "LeaseHeldError": "sync_project.store.errors",
    "LeaseLostError": "sync_project.store.errors",
    "StoreError": "sync_project.store.errors",
    "StoreUnavailableError": "sync_project.store.errors",
    "UnknownConnectionError": "sync_project.store.errors",
    "Change": "sync_project.store.feed",
    "ChangePage": "sync_project.store.feed",
    "InvalidCursorError": "sync_project.store.feed",
    "Lease": "sync_project.store.leases",
    "MergeResult": "sync_project.store.merge",
    "MergeStrategy": "sync_project.store.merge",
    "RecordSpec": "sync_project.store.merge",
    "PreparedBatch": "sync_project.store.records",
    "RecordWriter": "sync_project.store.records",
    "prepare": "sync_project.store.records",
    "FullWindow": "sync_project.store.state",
    "SyncState": "sync_project.store.state",
    "Store": "sync_project.store.store",
}

__all__ = [
    "Change",
    "ChangePage",
    "FullWindow",
    "InvalidBatchError",
    "InvalidCursorError",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "MergeResult",
    "MergeStrategy",
    "PreparedBatch",
    "ProviderConnection",
    "RecordSpec",
    "RecordWriter",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "SyncState",
    "UnknownConnectionError",
    "prepare",
]

if TYPE_CHECKING:
    from sync_project.core import ProviderConnection
    from sync_project.store.errors import (
        InvalidBatchError,
        LeaseHeldError,
        LeaseLostError,
        StoreError,
        StoreUnavailableError,
        UnknownConnectionError,
    )
    from sync_project.store.feed import Change, ChangePage, InvalidCursorError
    from sync_project.store.leases import Lease
    from sync_project.store.merge import MergeResult, MergeStrategy, RecordSpec
    from sync_project.store.records import PreparedBatch, RecordWriter, prepare
    from sync_project.store.state import FullWindow, SyncState
    from sync_project.store.store import Store


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
