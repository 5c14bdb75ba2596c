"""The merge vocabulary: what a sync hands the store and what the store answers.

A record (a mapping or a pydantic model), the changes a webhook handler returns (:class:`Save`,
:class:`Update`, :class:`Delete`), how conflicting copies are decided (:class:`MergeStrategy`,
:class:`RecordSpec`) and the counts every merge reports (:class:`MergeResult`). The rules that
apply them live in the store; these are only the words both sides use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel

from sync_project.core.errors import InvalidBatchError

#: One record as a sync yields it: the store validates and encodes either form the same way.
RecordLike = Mapping[str, Any] | BaseModel


class MergeStrategy(str, Enum):
    """How a write treats a stored record that may be fresher than the incoming copy."""

    #: Apply regardless.
    OVERRIDE = "override"
    #: Nango's: skip records modified in the store after this batch's data was fetched.
    IGNORE_IF_MODIFIED_AFTER = "ignore_if_modified_after"
    #: Skip records whose stored provider timestamp is newer than the incoming one. Correct under
    #: out-of-order webhooks too; the default whenever the model declares a provider timestamp.
    NEWEST_SOURCE_WINS = "newest_source_wins"

    @classmethod
    def parse(cls, value: MergeStrategy | str) -> MergeStrategy:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise InvalidBatchError(f"unknown merge strategy {value!r}; expected one of: {names}") from None


@dataclass(frozen=True)
class RecordSpec:
    """What the store needs to know about a synced model to merge it."""

    primary_key: str = "id"
    #: The record field holding the provider's last-modified timestamp, if the model has one.
    updated_field: str | None = None
    strategy: MergeStrategy = MergeStrategy.OVERRIDE

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", MergeStrategy.parse(self.strategy))
        if self.strategy is MergeStrategy.NEWEST_SOURCE_WINS and not self.updated_field:
            raise InvalidBatchError("newest_source_wins needs updated_field (the provider timestamp)")


@dataclass
class MergeResult:
    """True counts of what one or more batches did."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    skipped_stale: int = 0
    #: Partial updates for keys the store has no live record of (they are dropped, as Nango does).
    skipped_missing: int = 0

    def __iadd__(self, other: MergeResult) -> MergeResult:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def changed(self) -> int:
        return self.added + self.updated + self.deleted

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Save:
    """A whole record: inserted, or replacing the stored copy (under the sync's strategy)."""

    record: RecordLike
    #: Which of the sync's models (None: the sync's own); one event may change several.
    model: str | None = None


@dataclass(frozen=True)
class Update:
    """A partial record: deep-merged into the stored one; ignored if the store has none."""

    record: RecordLike
    model: str | None = None


@dataclass(frozen=True)
class Delete:
    """A tombstone: the record's key, and its provider timestamp when the event carries one."""

    record: RecordLike
    model: str | None = None


#: What a webhook handler returns, one per record it changes.
WebhookChange = Save | Update | Delete
