"""A sync: one object of one provider, declared once and turned into a Dagster asset.

A sync module is short: a pydantic model, a ``fetch`` generator yielding pages from a checkpoint,
optionally an ``on_webhook`` handler, and one :class:`SyncDefinition` tying them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import httpx
from pydantic import BaseModel

from sync_project.core.connection import ProviderConnection
from sync_project.core.provider import InboundEvent
from sync_project.core.records import MergeStrategy, RecordLike, RecordSpec, WebhookChange

FetchMode = Literal["full", "incremental"]


@dataclass
class Page:
    """One page of a fetch: merged, then ``checkpoint`` is stored in the same transaction."""

    #: A ``Sequence``, not a ``list``: a list of models is a sequence of records but (lists being
    #: mutable, hence invariant) not a ``list[RecordLike]``, which made every typed sync a mypy error.
    records: Sequence[RecordLike] = field(default_factory=list)
    #: Where the next incremental run (or a resumed one) starts; None keeps the previous one.
    checkpoint: dict[str, Any] | None = None
    #: Records the provider reports deleted (by key, and timestamp if known).
    deleted: Sequence[RecordLike] = field(default_factory=list)


@dataclass
class FetchContext:
    """What ``fetch`` gets: the client of the connection, where to start, and a logger."""

    client: httpx.Client
    connection: ProviderConnection
    mode: FetchMode
    #: The stored checkpoint (incremental runs); None on a full refresh or the very first run.
    checkpoint: dict[str, Any] | None
    log: logging.Logger | Any


@dataclass
class WebhookContext:
    """What ``on_webhook`` gets: the client (to fetch the full object if the event is thin)."""

    client: httpx.Client
    connection: ProviderConnection
    log: logging.Logger | Any


FetchFn = Callable[[FetchContext], Iterator[Page]]
WebhookFn = Callable[[WebhookContext, InboundEvent], Iterable[WebhookChange]]


@dataclass(frozen=True)
class SyncDefinition:
    provider: str
    name: str
    model: type[BaseModel]
    fetch: FetchFn
    description: str = ""
    primary_key: str = "id"
    #: The model field holding the provider's last-modified time (enables newest_source_wins).
    updated_field: str | None = None
    webhook_events: tuple[str, ...] = ()
    on_webhook: WebhookFn | None = None
    #: Default: newest_source_wins when ``updated_field`` is declared, else override.
    strategy: MergeStrategy | None = None
    #: How often to poll. At one minute or more this becomes a cron schedule; below, a sensor.
    poll_interval: timedelta = timedelta(minutes=15)
    #: Full refreshes tombstone records the provider no longer returns.
    track_deletes: bool = True

    def __post_init__(self) -> None:
        if self.webhook_events and self.on_webhook is None:
            raise ValueError(f"{self.key}: webhook_events declared without on_webhook")
        if self.poll_interval < timedelta(seconds=30):
            raise ValueError(f"{self.key}: poll_interval below 30 s would poll faster than runs start")

    @property
    def key(self) -> str:
        """``provider/object``: the sync's id in the store, the inbox and the CLI."""
        return f"{self.provider}/{self.name}"

    @property
    def record_spec(self) -> RecordSpec:
        strategy = self.strategy or (
            MergeStrategy.NEWEST_SOURCE_WINS if self.updated_field else MergeStrategy.OVERRIDE
        )
        return RecordSpec(primary_key=self.primary_key, updated_field=self.updated_field, strategy=strategy)

    def subscribes_to(self, event_type: str) -> bool:
        return any(pattern == "*" or pattern == event_type for pattern in self.webhook_events)

    @property
    def cron(self) -> str | None:
        """The polling cron, or None when the interval is sub-minute (a sensor polls instead)."""
        minutes = int(self.poll_interval.total_seconds() // 60)
        if minutes < 1:
            return None
        if minutes < 60:
            return f"*/{minutes} * * * *"
        hours = minutes // 60
        return f"0 */{hours} * * *" if hours < 24 else "0 0 * * *"

