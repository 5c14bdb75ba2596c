"""The declarative vocabulary: what a provider module and a sync module declare.

Provider modules (``sync_project.providers``) and sync modules (``sync_project.syncs``) are written
against these types only; the Dagster machinery in ``sync_project.orchestration`` turns them into
assets, schedules and sensors.
"""

from sync_project.core.provider import (
    InboundEvent,
    MalformedWebhookError,
    Provider,
    SignatureError,
    WebhookRequest,
)
from sync_project.core.sync import Delete, FetchContext, Page, Save, SyncDefinition, Update, WebhookContext

__all__ = [
    "Delete",
    "FetchContext",
    "InboundEvent",
    "MalformedWebhookError",
    "Page",
    "Provider",
    "Save",
    "SignatureError",
    "SyncDefinition",
    "Update",
    "WebhookContext",
    "WebhookRequest",
]
