"""What a provider module implements: an API client for its connections, and webhook intake."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sync_project.core.connection import ProviderConnection

if TYPE_CHECKING:
    import httpx


class SignatureError(Exception):
    """The delivery's signature is missing, wrong or outside its time tolerance (HTTP 401)."""


class MalformedWebhookError(Exception):
    """The delivery verified but cannot be understood (HTTP 400)."""


@dataclass(frozen=True)
class WebhookRequest:
    """A delivery exactly as received: signatures are computed over the raw bytes."""

    method: str
    #: Full URL as the provider called it (HubSpot v3 signs it).
    url: str
    #: Header names lower-cased.
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime


@dataclass(frozen=True)
class InboundEvent:
    """One event of a verified delivery (a HubSpot delivery carries a batch of them)."""

    #: The provider's id of this event: a redelivery carries the same key, and is stored once.
    event_key: str
    event_type: str
    #: The provider-side account the event belongs to (routes it to a connection); None = all.
    account_id: str | None
    payload: dict[str, Any]
    occurred_at: datetime | None = None


@dataclass
class Provider(ABC):
    """Base class of a provider module's ``PROVIDER`` object."""

    name: str
    #: Environment variable holding the webhook signing secret(s); comma-separated for rotation.
    webhook_secret_env: str | None = None
    default_base_url: str = ""

    def webhook_secrets(self) -> list[str]:
        if not self.webhook_secret_env:
            return []
        raw = os.environ.get(self.webhook_secret_env, "")
        return [secret.strip() for secret in raw.split(",") if secret.strip()]

    def check_secrets(self, secrets: list[str]) -> None:
        """Raise ``ValueError`` saying why one of ``secrets`` can never verify a delivery (checked
        when the receiver starts). Most schemes take any text as a key."""

    @abstractmethod
    def client(self, connection: ProviderConnection) -> httpx.Client:
        """An authenticated client for one connection (base URL, auth header, timeouts)."""

    @abstractmethod
    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        """Raise :class:`SignatureError` unless one of ``secrets`` signed ``request``."""

    @abstractmethod
    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        """Split a verified delivery into events; raise :class:`MalformedWebhookError` if unreadable."""


def load_json(body: bytes) -> Any:
    """A webhook body as JSON, or :class:`MalformedWebhookError` saying why not."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedWebhookError(f"body is not JSON: {error}") from None


def epoch_time(value: int, where: str, *, millis: bool = False) -> datetime:
    """A provider's Unix timestamp (seconds, or milliseconds) as a datetime, or
    :class:`MalformedWebhookError` (HTTP 400) when it is outside what a datetime holds: a verified
    delivery that can never be stored. Even the division by 1000 overflows for a huge integer."""
    try:
        return datetime.fromtimestamp(value / 1000 if millis else value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise MalformedWebhookError(f"{where} is not a timestamp between the years 1 and 9999") from None
