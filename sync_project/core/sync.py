"""A sync: one object of one provider, declared once and turned into a Dagster asset.

A sync module is short: a pydantic model, a ``fetch`` generator yielding pages from a checkpoint,
optionally an ``on_webhook`` handler, and one :class:`SyncDefinition` tying them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel

from sync_project.core.connection import ProviderConnection
from sync_project.core.provider import InboundEvent
from sync_project.core.records import MergeStrategy, RecordLike, RecordSpec, WebhookChange

if TYPE_CHECKING:
    import httpx

FetchMode = Literal["full", "incremental"]
#: What a reset of a sync's partition does with its records: keep them, tombstone each (the change
#: feed shows them deleted; the next poll restores what the provider still has), or remove the
#: rows. One rule for the store's reset, the run config and the command.
RecordsAction = Literal["keep", "tombstone", "remove"]
RECORDS_ACTIONS: tuple[RecordsAction, ...] = get_args(RecordsAction)


@dataclass
class Page:
    """One page of a fetch: merged, then ``checkpoint`` is stored in the same transaction."""

    #: A ``Sequence``, not a ``list``: a list of models is a sequence of records but (lists being
    #: mutable, hence invariant) not a ``list[RecordLike]``, which made every typed sync a mypy error.
    records: Sequence[RecordLike] = field(default_factory=list)
    #: Where the next incremental run (or a resumed one) starts; None keeps the previous one.
    #: One checkpoint per sync, whichever model a page is of: one fetch yields them all.
    checkpoint: dict[str, Any] | None = None
    #: Records the provider reports deleted (by key, and timestamp if known).
    deleted: Sequence[RecordLike] = field(default_factory=list)
    #: Which of the sync's models the records are (:attr:`SyncDefinition.models`); None: the sync's own.
    model: str | None = None


@dataclass
class FetchContext:
    """What ``fetch`` gets: the client of the connection, where to start, and a logger."""

    client: httpx.Client
    connection: ProviderConnection
    mode: FetchMode
    #: Incremental runs: the stored checkpoint (None on the very first run). Full refreshes: None
    #: on their first run; a run resuming one that a killed run left open gets the checkpoint of
    #: that refresh's last committed page, and continues the walk from there.
    checkpoint: dict[str, Any] | None
    log: logging.Logger | Any


@dataclass
class WebhookContext:
    """What ``on_webhook`` gets: the client (to fetch the full object if the event is thin)."""

    client: httpx.Client
    connection: ProviderConnection
    log: logging.Logger | Any


@dataclass(frozen=True)
class SyncModel:
    """One model of a sync: its records, keyed ``provider/name`` in the store, are the Dagster
    asset ``[provider, name]``, with their own change feed and counts.

    A sync's own model is declared on the :class:`SyncDefinition` itself, as a single-model sync
    always did; further ones (``SyncDefinition.models``) are fetched by the same ``fetch``, in
    pages that name them (``Page.model``), and changed by webhooks that name them (``Save(...,
    model=...)``): issues and their comments, contacts and their companies, read once.
    """

    name: str
    model: type[BaseModel]
    primary_key: str = "id"
    updated_field: str | None = None
    strategy: MergeStrategy | None = None
    track_deletes: bool = True
    description: str = ""

    @property
    def record_spec(self) -> RecordSpec:
        """Default strategy: newest_source_wins when the model has a provider timestamp, else override."""
        strategy = self.strategy or (MergeStrategy.NEWEST_SOURCE_WINS if self.updated_field else MergeStrategy.OVERRIDE)
        return RecordSpec(primary_key=self.primary_key, updated_field=self.updated_field, strategy=strategy)


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
    #: Further models the same fetch yields (each its own asset, records and counts); none for
    #: a sync of one model.
    models: tuple[SyncModel, ...] = ()
    #: How often a poll tick runs a full refresh instead of an incremental poll, so deletes whose
    #: webhook was lost (incremental polls cannot see deletes) heal within this long; a
    #: connection may override it. None: only when someone asks for one.
    full_refresh_interval: timedelta | None = timedelta(days=1)

    def __post_init__(self) -> None:
        if self.webhook_events and self.on_webhook is None:
            raise ValueError(f"{self.key}: webhook_events declared without on_webhook")
        names = [self.name, *(m.name for m in self.models)]
        if len(set(names)) != len(names):
            raise ValueError(
                f"{self.key}: model names must differ from each other and from the sync's ({', '.join(names)})"
            )
        if self.poll_interval < timedelta(seconds=30):
            raise ValueError(f"{self.key}: poll_interval below 30 s would poll faster than runs start")
        if self.full_refresh_interval is not None and self.full_refresh_interval < self.poll_interval:
            raise ValueError(f"{self.key}: full_refresh_interval shorter than poll_interval")

    @property
    def key(self) -> str:
        """``provider/object``: the sync's id in the store, the inbox and the CLI."""
        return f"{self.provider}/{self.name}"

    @property
    def record_spec(self) -> RecordSpec:
        return self.own_model.record_spec

    @property
    def own_model(self) -> SyncModel:
        """The sync's own model, as its fields declare it."""
        return SyncModel(
            name=self.name,
            model=self.model,
            primary_key=self.primary_key,
            updated_field=self.updated_field,
            strategy=self.strategy,
            track_deletes=self.track_deletes,
            description=self.description,
        )

    @property
    def all_models(self) -> tuple[SyncModel, ...]:
        """The sync's own model first, then the further ones."""
        return (self.own_model, *self.models)

    def model_key(self, model: str | None) -> str:
        """The store's key (``provider/name``) of the records of ``model`` (None: the sync's own)."""
        if model is None or model == self.name:
            return self.key
        if not any(m.name == model for m in self.models):
            known = ", ".join(m.name for m in self.all_models)
            raise ValueError(f"{self.key} declares no model {model!r} (its models: {known})")
        return f"{self.provider}/{model}"

    def model_spec(self, model: str | None) -> RecordSpec:
        if model is None or model == self.name:
            return self.record_spec
        self.model_key(model)  # raises for an unknown model
        return next(m for m in self.models if m.name == model).record_spec

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
