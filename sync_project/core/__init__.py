"""The declarative vocabulary: what a provider module and a sync module declare.

Provider modules (``sync_project.providers``) and sync modules (``sync_project.syncs``) are written
against these names only, imported from ``sync_project.core`` itself; the Dagster machinery in
``sync_project.orchestration`` turns them into assets, schedules and sensors, and the store
(``sync_project.store``) keeps what they produce. ``core`` imports nothing else of the package,
and nothing heavier than pydantic (an import-linter contract and a test check both).

Not even httpx: every run process imports the code location before its first step, and httpx
(with the idna and rich it pulls in) would be most of what the project adds to that, so a process
pays for it when it builds a client (``make_client``) instead. ``core`` names httpx in annotations
only (under ``TYPE_CHECKING``), and the transports subclassing it are a submodule,
``sync_project.core.transports``, imported where a client is built; provider modules do the same.

The signature schemes are submodules: ``from sync_project.core import signing, standard_webhooks``.
"""

from sync_project.core import signing, standard_webhooks
from sync_project.core.clock import utcnow
from sync_project.core.connection import ConnectionStatus, ProviderConnection
from sync_project.core.errors import InvalidBatchError, StoreError
from sync_project.core.http import ProviderAuthError, ProviderError, Sleep, json_body, make_client, parse_retry_after
from sync_project.core.pagination import (
    ListPage,
    cursor_pages,
    link_pages,
    next_link,
    offset_pages,
    parse_records,
    server_time,
    time_window_pages,
)
from sync_project.core.provider import (
    InboundEvent,
    MalformedWebhookError,
    Provider,
    SignatureError,
    WebhookRequest,
    epoch_time,
    load_json,
)
from sync_project.core.records import (
    Delete,
    MergeResult,
    MergeStrategy,
    RecordLike,
    RecordSpec,
    Save,
    Update,
    WebhookChange,
)
from sync_project.core.sync import (
    RECORDS_ACTIONS,
    FetchContext,
    FetchMode,
    Page,
    RecordsAction,
    SyncDefinition,
    SyncModel,
    WebhookContext,
)

__all__ = [
    "RECORDS_ACTIONS",
    "ConnectionStatus",
    "Delete",
    "FetchContext",
    "FetchMode",
    "InboundEvent",
    "InvalidBatchError",
    "ListPage",
    "MalformedWebhookError",
    "MergeResult",
    "MergeStrategy",
    "Page",
    "Provider",
    "ProviderAuthError",
    "ProviderConnection",
    "ProviderError",
    "RecordLike",
    "RecordSpec",
    "RecordsAction",
    "Save",
    "SignatureError",
    "Sleep",
    "StoreError",
    "SyncDefinition",
    "SyncModel",
    "Update",
    "WebhookChange",
    "WebhookContext",
    "WebhookRequest",
    "cursor_pages",
    "epoch_time",
    "json_body",
    "link_pages",
    "load_json",
    "make_client",
    "next_link",
    "offset_pages",
    "parse_records",
    "parse_retry_after",
    "server_time",
    "signing",
    "standard_webhooks",
    "time_window_pages",
    "utcnow",
]
