"""The records store: guarded merges, change feed, connections, sync state and inbox."""

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
