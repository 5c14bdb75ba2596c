"""The merge rules, as pure functions over one batch and the stored state of its keys.

The store reads the stored state of a batch's keys under the (sync, connection) batch lock, asks
:func:`plan_batch` what to write, and writes exactly that. Keeping the rules free of SQL keeps them
identical on both backends and lets the property tests exercise them directly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel

from sync_project.store.errors import InvalidBatchError

Action = Literal["save", "update", "delete"]


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
class Incoming:
    """One validated record of a batch."""

    key: str
    data: dict[str, Any]
    data_json: str
    data_hash: str
    source_updated_at: datetime | None


@dataclass(frozen=True)
class Stored:
    """What the store holds for one key, as far as the merge rules need it."""

    data_hash: str
    source_updated_at: datetime | None
    last_modified_at: datetime
    deleted_at: datetime | None
    data_json: str | None = None  # read only for partial updates


@dataclass(frozen=True)
class Write:
    """One row to upsert."""

    key: str
    #: None for a tombstone over an existing record: its last content is kept.
    data_json: str | None
    data_hash: str | None
    source_updated_at: datetime | None
    deleted: bool
    last_action: Literal["added", "updated", "deleted"]
    is_new: bool


@dataclass
class Plan:
    writes: list[Write] = field(default_factory=list)
    #: Keys seen but not written (unchanged, stale): a full refresh still marks them as seen.
    untouched: list[str] = field(default_factory=list)
    result: MergeResult = field(default_factory=MergeResult)


def canonical_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_hash(data_json: str) -> str:
    return hashlib.md5(data_json.encode(), usedforsecurity=False).hexdigest()


def parse_timestamp(value: Any) -> datetime:
    """A provider timestamp as an aware UTC datetime: datetime, ISO-8601 text, or epoch s/ms."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        return parse_timestamp(parsed)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        # Epoch milliseconds (HubSpot, JavaScript) are above 1e11; seconds will not be until 5138.
        seconds = value / 1000 if abs(value) >= 1e11 else value
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    raise ValueError(f"not a timestamp: {value!r}")


def prepare_batch(
    action: Action,
    records: Iterable[Mapping[str, Any] | BaseModel],
    spec: RecordSpec,
    fetched_at: datetime,
) -> list[Incoming]:
    """Validate a whole batch before anything is written, and collapse duplicate keys.

    Duplicates keep the newest provider version under ``newest_source_wins`` and the last copy
    otherwise; partial updates to one key are merged in order.
    """
    if action not in ("save", "update", "delete"):
        raise InvalidBatchError(f"unknown action {action!r}; expected save, update or delete")
    by_key: dict[str, Incoming] = {}
    for index, raw in enumerate(records):
        data = raw.model_dump(mode="json") if isinstance(raw, BaseModel) else raw
        if not isinstance(data, Mapping):
            raise InvalidBatchError(f"record #{index} is a {type(data).__name__}, not a JSON object")
        key_value = data.get(spec.primary_key)
        if key_value is None or key_value == "" or isinstance(key_value, (bool, dict, list, float)):
            raise InvalidBatchError(
                f"record #{index} has no usable primary key {spec.primary_key!r} (got {key_value!r})"
            )
        key = str(key_value)
        if len(key) > 255:
            raise InvalidBatchError(f"record #{index}: primary key longer than 255 characters")
        data = dict(data)
        try:
            data_json = canonical_json(data)
        except (TypeError, ValueError) as error:
            raise InvalidBatchError(f"record {key!r} is not JSON: {error}") from None
        source_updated_at = _source_timestamp(data, spec, action, fetched_at, key)
        previous = by_key.get(key)
        if previous is not None:
            if action == "update":
                merged = deep_merge(previous.data, data)
                data_json = canonical_json(merged)
                data = merged
                source_updated_at = _max_time(previous.source_updated_at, source_updated_at)
            elif (
                spec.strategy is MergeStrategy.NEWEST_SOURCE_WINS
                and previous.source_updated_at is not None
                and source_updated_at is not None
                and previous.source_updated_at > source_updated_at
            ):
                continue
        by_key[key] = Incoming(key, data, data_json, content_hash(data_json), source_updated_at)
    return list(by_key.values())


def _source_timestamp(
    data: Mapping[str, Any], spec: RecordSpec, action: Action, fetched_at: datetime, key: str
) -> datetime | None:
    if not spec.updated_field:
        return None
    value = data.get(spec.updated_field)
    if value is None:
        if action == "delete":
            # A delete event rarely carries the record's timestamp; the provider said "gone" no
            # later than when we fetched that news, so copies older than that must not resurrect.
            return fetched_at
        if action == "update" or spec.strategy is not MergeStrategy.NEWEST_SOURCE_WINS:
            return None
        raise InvalidBatchError(
            f"record {key!r} has no {spec.updated_field!r}, which newest_source_wins needs"
        )
    try:
        return parse_timestamp(value)
    except (ValueError, OverflowError, OSError) as error:
        raise InvalidBatchError(f"record {key!r}: bad {spec.updated_field!r}: {error}") from None


def _max_time(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def deep_merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; anything else (arrays included) is replaced."""
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def is_stale(incoming: Incoming, stored: Stored, spec: RecordSpec, fetched_at: datetime) -> bool:
    """Whether the guard of ``spec.strategy`` rejects ``incoming`` over ``stored``."""
    if spec.strategy is MergeStrategy.IGNORE_IF_MODIFIED_AFTER:
        return stored.last_modified_at > fetched_at
    if spec.strategy is MergeStrategy.NEWEST_SOURCE_WINS:
        if stored.source_updated_at is None or incoming.source_updated_at is None:
            return False
        return stored.source_updated_at > incoming.source_updated_at
    return False


def plan_batch(
    action: Action,
    batch: Sequence[Incoming],
    stored: Mapping[str, Stored],
    spec: RecordSpec,
    fetched_at: datetime,
) -> Plan:
    """Decide, per record, what to write and how to count it."""
    plan = Plan()
    result = plan.result
    for item in batch:
        current = stored.get(item.key)
        if current is not None and is_stale(item, current, spec, fetched_at):
            result.skipped_stale += 1
            plan.untouched.append(item.key)
            continue
        if action == "save":
            if current is None or current.deleted_at is not None:
                result.added += 1
                plan.writes.append(_write(item, "added", is_new=current is None))
            elif current.data_hash == item.data_hash:
                result.unchanged += 1
                plan.untouched.append(item.key)
            else:
                result.updated += 1
                plan.writes.append(_write(item, "updated", is_new=False))
        elif action == "update":
            if current is None or current.deleted_at is not None:
                result.skipped_missing += 1
                continue
            merged = deep_merge(json.loads(current.data_json or "{}"), item.data)
            merged_json = canonical_json(merged)
            merged_hash = content_hash(merged_json)
            if merged_hash == current.data_hash:
                result.unchanged += 1
                plan.untouched.append(item.key)
                continue
            result.updated += 1
            source = _max_time(current.source_updated_at, item.source_updated_at)
            plan.writes.append(
                Write(item.key, merged_json, merged_hash, source, False, "updated", is_new=False)
            )
        else:  # delete: a tombstone keeps the last content, so the feed can show what went away
            if current is not None and current.deleted_at is not None:
                result.unchanged += 1
                plan.untouched.append(item.key)
                continue
            result.deleted += 1
            source = item.source_updated_at
            if current is not None:
                source = _max_time(current.source_updated_at, source)
            plan.writes.append(
                Write(
                    item.key,
                    item.data_json if current is None else None,
                    item.data_hash if current is None else None,
                    source,
                    True,
                    "deleted",
                    is_new=current is None,
                )
            )
    return plan


def _write(item: Incoming, last_action: Literal["added", "updated"], *, is_new: bool) -> Write:
    return Write(
        item.key, item.data_json, item.data_hash, item.source_updated_at, False, last_action, is_new
    )
