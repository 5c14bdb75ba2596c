"""The records store: guarded merges, change feed, connections, sync state and inbox."""

from sync_project.store.connections import ProviderConnection
from sync_project.store.errors import (
    InvalidBatchError,
    StoreError,
    StoreUnavailableError,
    SyncAlreadyRunningError,
    UnknownConnectionError,
)
from sync_project.store.feed import Change, ChangePage, InvalidCursorError
from sync_project.store.merge import MergeResult, MergeStrategy, RecordSpec
from sync_project.store.records import PreparedBatch, RecordWriter, prepare
from sync_project.store.store import Store

__all__ = [
    "Change",
    "ChangePage",
    "InvalidBatchError",
    "InvalidCursorError",
    "MergeResult",
    "MergeStrategy",
    "PreparedBatch",
    "ProviderConnection",
    "RecordSpec",
    "RecordWriter",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "SyncAlreadyRunningError",
    "UnknownConnectionError",
    "prepare",
]
