"""The merge rules, in one place: pure functions over a batch and the stored state of its keys.

The store reads the stored state of a batch's keys under the (sync, connection) batch lock, asks
:func:`plan_batch` what to write, and writes exactly that. Keeping the rules free of SQL keeps them
identical on both backends and lets the property tests exercise them directly.

- :data:`GUARDS` declares each strategy's guard once; :func:`rejects` evaluates it and
  :func:`guard_sql` renders it for the one set-based execution (the write-first save on Postgres,
  ``store/bulk.py``), so the two executions of a plan cannot drift apart.
- :func:`prepare_batch` validates and collapses a batch (:func:`supersedes`: the same guard).
- :func:`segments` and :func:`plan_in_order` plan an event-ordered batch (a webhook run's) as its
  segments merged one after another, over one read of its keys, so it is written once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel

from sync_project.core.records import MergeResult, MergeStrategy, RecordSpec
from sync_project.store.errors import InvalidBatchError

Action = Literal["save", "update", "delete"]


class Incoming(NamedTuple):
    """One validated record of a batch (after duplicate keys were collapsed).

    The three row types here are named tuples: a page builds thousands of them, and a tuple is
    built several times faster than a frozen dataclass.
    """

    key: str
    data: dict[str, Any]
    data_json: str
    #: Computed while preparing, which may run ahead of the transaction (see ``records.prepare``);
    #: empty for a partial update, whose merged result is hashed instead.
    data_hash: str
    source_updated_at: datetime | None
    #: Partial updates only: every patch for this key as (data, provider timestamp), in the order
    #: they apply (oldest first when all carry a timestamp, else as they came).
    patches: tuple[tuple[dict[str, Any], datetime | None], ...] = ()


class Stored(NamedTuple):
    """What the store holds for one key, as far as the merge rules need it."""

    data_hash: str
    source_updated_at: datetime | None
    #: Read only when the strategy compares it (ignore_if_modified_after).
    last_modified_at: datetime | None
    deleted: bool
    data_json: str | None = None  # read only for partial updates


class Write(NamedTuple):
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
    #: Unchanged records whose provider timestamp moved forward (a second delete, newer than the
    #: tombstone): only source_updated_at is written, so later stale copies still lose, while
    #: last_modified_at and the change feed stay put.
    advance: list[tuple[str, datetime]] = field(default_factory=list)
    result: MergeResult = field(default_factory=MergeResult)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The C encoder behind json.dumps, built once: JSONEncoder.encode builds a new one per call, which
# is a third of the cost of encoding a 500-byte record. No circular-reference markers (a shared
# markers dict is not thread-safe): a cycle ends in RecursionError, which prepare_batch reports.
_MAKE_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # private, untyped; absent off CPython
_C_ENCODER = (
    _MAKE_C_ENCODER(None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    if _MAKE_C_ENCODER is not None
    else None
)


def canonical_json(data: Mapping[str, Any]) -> str:
    """The text the store keeps and hashes: sorted keys, no whitespace, no NaN/Infinity."""
    if _C_ENCODER is None:
        return _ENCODER.encode(data)
    return "".join(_C_ENCODER(data, 0))


def content_hash(data_json: str) -> str:
    return hashlib.md5(data_json.encode(), usedforsecurity=False).hexdigest()


def parse_timestamp(value: Any) -> datetime:
    """A provider timestamp as an aware UTC datetime: datetime, ISO-8601 text, or epoch s/ms.

    Text without an offset is taken as UTC (providers that omit it mean UTC).
    """
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

    Duplicates of a full record keep the newest provider version under ``newest_source_wins`` (the
    later copy on a tie) and the last copy otherwise; duplicates of a delete keep the newest
    timestamp. Partial updates to one key are all kept, as patches applied in order, because each
    must pass the guard on its own: folding an old patch into a newer one would smuggle it past.
    """
    if action not in ("save", "update", "delete"):
        raise InvalidBatchError(f"unknown action {action!r}; expected save, update or delete")
    if isinstance(records, (Mapping, BaseModel, str, bytes)):
        raise InvalidBatchError("a batch is a list of records, not a single record")
    newest_wins = spec.strategy is MergeStrategy.NEWEST_SOURCE_WINS
    primary_key = spec.primary_key
    updated_field = spec.updated_field
    encode = canonical_json
    md5 = hashlib.md5
    is_update = action == "update"
    by_key: dict[str, Incoming] = {}
    # The loop runs once per record of every batch: common shapes take the inline fast paths
    # (string key, ISO text timestamp); everything else goes through the careful helpers.
    for index, data in enumerate(records):
        if type(data) is not dict:
            if isinstance(data, BaseModel):
                data = data.model_dump(mode="json")
            elif isinstance(data, Mapping):
                data = dict(data)
            else:
                raise InvalidBatchError(f"record #{index} is a {type(data).__name__}, not a JSON object")
        key = data.get(primary_key)
        if type(key) is not str or not 0 < len(key) <= 255 or "\x00" in key:
            key = _key(key, index, primary_key)
        try:
            data_json = encode(data)
            # Encoding also proves the text is valid UTF-8 (a lone surrogate is not). A patch's
            # own hash is never used: the merged record gets one.
            data_bytes = data_json.encode()
            data_hash = "" if is_update else md5(data_bytes, usedforsecurity=False).hexdigest()
        except (TypeError, ValueError, RecursionError) as error:  # UnicodeEncodeError is a ValueError
            raise InvalidBatchError(f"record {key!r} is not JSON: {_json_problem(error)}") from None
        source_updated_at: datetime | None = None
        if updated_field is not None:
            stamp = data.get(updated_field)
            if type(stamp) is str and (stamp[-6:] == "+00:00" or stamp[-1:] == "Z"):
                try:
                    source_updated_at = datetime.fromisoformat(stamp)
                except ValueError:
                    source_updated_at = _source_timestamp(data, spec, action, fetched_at, key)
            else:
                source_updated_at = _source_timestamp(data, spec, action, fetched_at, key)
        previous = by_key.get(key)
        if action == "update":
            patches: tuple[tuple[dict[str, Any], datetime | None], ...] = ((data, source_updated_at),)
            if previous is not None:
                patches = previous.patches + patches
                stamps = [stamp for _, stamp in patches if stamp is not None]
                if len(stamps) == len(patches):
                    # stable on ties; every stamp is set, so None never reaches the comparison
                    patches = tuple(sorted(patches, key=lambda patch: patch[1] or datetime.min))
                source_updated_at = _max_time(previous.source_updated_at, source_updated_at)
            by_key[key] = Incoming(key, data, data_json, data_hash, source_updated_at, patches)
            continue
        if previous is None or not supersedes(previous, source_updated_at, action, newest_wins):
            by_key[key] = Incoming(key, data, data_json, data_hash, source_updated_at)
    return list(by_key.values())


def supersedes(kept: Incoming, source_updated_at: datetime | None, action: Action, newest_wins: bool) -> bool:
    """Whether ``kept`` stays when a later full copy or delete of its key, with this provider
    timestamp, joins the same batch (see :func:`prepare_batch`; partial updates never collapse).

    The same guard as across batches: inside one batch a newer provider version wins under
    ``newest_source_wins``, and a delete is always dated, so an older one never displaces it."""
    return (newest_wins or action == "delete") and GUARDS[MergeStrategy.NEWEST_SOURCE_WINS].rejects(
        kept.source_updated_at, None, source_updated_at, None
    )


def _json_problem(error: Exception) -> str:
    if isinstance(error, UnicodeEncodeError):
        return f"text with an unpaired surrogate ({error.object[error.start : error.end]!r}) is not valid Unicode"
    if "Out of range float" in str(error):
        return "NaN and Infinity have no JSON form"
    if isinstance(error, RecursionError):
        return "it refers to itself, or nests too deeply"
    return str(error)


def _key(value: Any, index: int, primary_key: str) -> str:
    if isinstance(value, str):
        key = value
    elif isinstance(value, int) and not isinstance(value, bool):
        key = str(value)
    else:
        raise InvalidBatchError(
            f"record #{index} has no usable primary key {primary_key!r} (got {value!r}; "
            "expected a non-empty string or an integer)"
        )
    if not key or len(key) > 255 or "\x00" in key:
        raise InvalidBatchError(
            f"record #{index}: primary key {primary_key!r} must be 1 to 255 characters without NUL (got {key[:40]!r})"
        )
    return key


def _newer(a: datetime | None, b: datetime | None) -> bool:
    """Whether ``a`` is strictly newer than ``b`` (unknown is never newer)."""
    return a is not None and b is not None and a > b


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
        raise InvalidBatchError(f"record {key!r} has no {spec.updated_field!r}, which newest_source_wins needs")
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


class Guard(NamedTuple):
    """A strategy's guard, declared once: reject an incoming copy when the stored row's ``stored``
    value is later than the incoming side's ``incoming`` value (both known). The Python plan
    evaluates it (:func:`rejects`) and the set-based SQL execution renders it (:func:`guard_sql`),
    so the two executions cannot drift apart."""

    #: The stored row's column compared, or None: the strategy never rejects.
    stored: Literal["source_updated_at", "last_modified_at"] | None
    #: The incoming side: the copy's provider timestamp, or the batch's fetched_at.
    incoming: Literal["source_updated_at", "fetched_at"] | None

    def rejects(
        self,
        stored_source: datetime | None,
        stored_modified: datetime | None,
        incoming_source: datetime | None,
        fetched_at: datetime | None,
    ) -> bool:
        if self.stored is None:
            return False
        stored: datetime | None = stored_source
        if self.stored == "last_modified_at":
            if stored_modified is None:
                raise AssertionError("ignore_if_modified_after needs the stored last_modified_at")
            stored = stored_modified
        return _newer(stored, fetched_at if self.incoming == "fetched_at" else incoming_source)


GUARDS: dict[MergeStrategy, Guard] = {
    MergeStrategy.OVERRIDE: Guard(None, None),
    # Nango's: someone wrote the record after we read our copy.
    MergeStrategy.IGNORE_IF_MODIFIED_AFTER: Guard("last_modified_at", "fetched_at"),
    # The provider's own version order: unknown provider time is never newer.
    MergeStrategy.NEWEST_SOURCE_WINS: Guard("source_updated_at", "source_updated_at"),
}


def rejects(
    strategy: MergeStrategy,
    stored_source: datetime | None,
    stored_modified: datetime | None,
    incoming_source: datetime | None,
    fetched_at: datetime,
) -> bool:
    """Whether the guard of ``strategy`` rejects an incoming copy over the stored one."""
    return GUARDS[strategy].rejects(stored_source, stored_modified, incoming_source, fetched_at)


def guard_sql(
    strategy: MergeStrategy, table: str, *, incoming: str = "excluded", fetched_at: str = "%(fetched_at)s"
) -> str:
    """The guard of ``strategy`` as SQL that is true when the stored row (``table``) may be
    overwritten by the incoming row (``incoming``, e.g. an upsert's ``excluded``): the negation
    of :func:`rejects`, with unknown (NULL) values never newer."""
    guard = GUARDS[strategy]
    if guard.stored is None or guard.incoming is None:
        return "TRUE"
    stored = f"{table}.{guard.stored}"
    if guard.incoming == "fetched_at":
        return f"({stored} IS NULL OR {stored} <= {fetched_at})"
    other = f"{incoming}.{guard.incoming}"
    return f"({stored} IS NULL OR {other} IS NULL OR {stored} <= {other})"


def plan_batch(
    action: Action,
    batch: Sequence[Incoming],
    stored: Mapping[str, Stored],
    spec: RecordSpec,
    fetched_at: datetime,
) -> Plan:
    """Decide, per record, what to write and how to count it (each key counts once)."""
    plan = Plan()
    result = plan.result
    writes = plan.writes
    untouched = plan.untouched
    guard = GUARDS[spec.strategy]
    for item in batch:
        current = stored.get(item.key)
        if action == "update":
            _plan_update(item, current, guard, fetched_at, plan)
            continue
        if current is None:
            # A tombstone for a key never seen is written too: a stale copy arriving later must
            # not create the record.
            deleting = action == "delete"
            if deleting:
                result.deleted += 1
            else:
                result.added += 1
            writes.append(_content_write(item, deleted=deleting, last_action="deleted" if deleting else "added"))
            continue
        if guard.rejects(current.source_updated_at, current.last_modified_at, item.source_updated_at, fetched_at):
            result.skipped_stale += 1
            untouched.append(item.key)
            continue
        if action == "save":
            if current.deleted:
                result.added += 1
                writes.append(_content_write(item, deleted=False, last_action="added", is_new=False))
                continue
            if current.data_hash == item.data_hash:
                result.unchanged += 1
                untouched.append(item.key)
                if _newer(item.source_updated_at, current.source_updated_at):
                    plan.advance.append((item.key, item.source_updated_at))  # type: ignore[arg-type]
            else:
                result.updated += 1
                writes.append(_content_write(item, deleted=False, last_action="updated", is_new=False))
        else:  # delete: a tombstone keeps the last content, so the feed can show what went away
            if current.deleted:
                result.unchanged += 1
                untouched.append(item.key)
                if _newer(item.source_updated_at, current.source_updated_at) or (
                    current.source_updated_at is None and item.source_updated_at is not None
                ):
                    plan.advance.append((item.key, item.source_updated_at))  # type: ignore[arg-type]
                continue
            result.deleted += 1
            source = _max_time(current.source_updated_at, item.source_updated_at)
            writes.append(Write(item.key, None, None, source, deleted=True, last_action="deleted", is_new=False))
    return plan


def _content_write(
    item: Incoming, *, deleted: bool, last_action: Literal["added", "updated", "deleted"], is_new: bool = True
) -> Write:
    """The row of ``item`` as it came (content, hash, provider timestamp)."""
    return Write(item.key, item.data_json, item.data_hash, item.source_updated_at, deleted, last_action, is_new)


def _plan_update(item: Incoming, current: Stored | None, guard: Guard, fetched_at: datetime, plan: Plan) -> None:
    """Apply each patch of ``item`` that passes the guard against the state so far."""
    if current is None or current.deleted:
        plan.result.skipped_missing += 1
        return
    content: dict[str, Any] = json.loads(current.data_json or "{}")
    source = current.source_updated_at
    applied = False
    for patch, stamp in item.patches:
        if guard.rejects(source, current.last_modified_at, stamp, fetched_at):
            continue
        content = deep_merge(content, patch)
        source = _max_time(source, stamp)
        applied = True
    if not applied:
        plan.result.skipped_stale += 1
        plan.untouched.append(item.key)
        return
    merged_json = canonical_json(content)
    merged_hash = content_hash(merged_json)
    if merged_hash == current.data_hash:
        plan.result.unchanged += 1
        plan.untouched.append(item.key)
        if source is not None and _newer(source, current.source_updated_at):
            plan.advance.append((item.key, source))
        return
    plan.result.updated += 1
    plan.writes.append(
        Write(item.key, merged_json, merged_hash, source, deleted=False, last_action="updated", is_new=False)
    )


class Step(NamedTuple):
    """One change of an event-ordered batch (a webhook batch): its action, its record prepared by
    :func:`prepare_batch` on its own, and when it was produced (its handler ran)."""

    action: Action
    incoming: Incoming
    produced_at: datetime


#: For these actions a repeated key collapses as :func:`prepare_batch` collapses it (last copy, or
#: the newest provider version), which ends where applying them one by one would. Partial updates
#: do not collapse: a deep merge of patches differs when a field changes type.
_COLLAPSIBLE: frozenset[Action] = frozenset({"save", "delete"})
_ACTIONS: tuple[Action, ...] = ("save", "update", "delete")


def segments(steps: Sequence[Step], spec: RecordSpec) -> list[tuple[datetime, dict[Action, list[Incoming]]]]:
    """Cut event-ordered ``steps`` into as few plain batches as their order allows.

    Steps go into one save, one update and one delete batch while their keys are disjoint; a key
    that comes back under another action (a save then a delete of one record), or as a second
    partial update, starts the next segment, so the later change lands after the earlier one.
    Each segment carries its ``fetched_at``: the time its newest step was produced, and never
    earlier than the previous segment's, so a batch's own earlier changes never make its later
    ones look stale (the writer holds the batch lock since before the first step was produced).
    """
    newest_wins = spec.strategy is MergeStrategy.NEWEST_SOURCE_WINS
    cut: list[tuple[datetime, dict[Action, list[Incoming]]]] = []
    batches: dict[Action, dict[str, Incoming]] = {action: {} for action in _ACTIONS}
    keys: dict[str, Action] = {}
    newest: datetime | None = None

    def close() -> None:
        nonlocal newest
        if newest is None or not keys:
            return
        fetched_at = max(newest, cut[-1][0]) if cut else newest
        cut.append((fetched_at, {action: list(batches[action].values()) for action in _ACTIONS if batches[action]}))
        for batch in batches.values():
            batch.clear()
        keys.clear()

    for action, incoming, produced_at in steps:
        earlier = keys.get(incoming.key)
        if earlier is not None and not (earlier == action and earlier in _COLLAPSIBLE):
            close()
        batch = batches[action]
        kept = batch.get(incoming.key)
        if kept is None or not supersedes(kept, incoming.source_updated_at, action, newest_wins):
            batch[incoming.key] = incoming
        keys[incoming.key] = action
        newest = produced_at
    close()
    return cut


def plan_in_order(steps: Sequence[Step], stored: Mapping[str, Stored], spec: RecordSpec) -> Plan:
    """One plan for event-ordered ``steps`` over the stored state of all their keys.

    The same rules as applying each segment (see :func:`segments`) as its own merge, one after
    another: each segment is planned by :func:`plan_batch` against the state the earlier ones
    left, kept here in memory, so the whole batch costs one read and one write of each row it
    changes. The counts are the segments' counts summed. The plan's writes are the final state
    of every key written (in order of first write; ``is_new`` when the key was not stored before
    the batch); ``advance`` holds the keys only whose provider timestamp moved.

    ``stored`` must hold the content (``data_json``) of the keys a partial update touches.
    """
    state = dict(stored)
    final = Plan()
    written: dict[str, Literal["added", "updated", "deleted"]] = {}
    advanced: dict[str, None] = {}
    for fetched_at, batches in segments(steps, spec):
        for action, items in batches.items():
            plan = plan_batch(action, items, state, spec, fetched_at)
            final.result += plan.result
            final.untouched.extend(plan.untouched)
            for write in plan.writes:
                before = state.get(write.key)
                if write.data_json is None:  # a tombstone keeps the content it had
                    assert before is not None
                    content, data_hash = before.data_json, before.data_hash
                else:
                    content, data_hash = write.data_json, write.data_hash or ""
                # Written in this batch: stamped after every earlier write, and never after a
                # later segment's fetched_at (see segments), so it is never stale to those.
                state[write.key] = Stored(data_hash, write.source_updated_at, fetched_at, write.deleted, content)
                written[write.key] = write.last_action
            for key, source in plan.advance:
                state[key] = state[key]._replace(source_updated_at=source)
                advanced[key] = None
    for key, last_action in written.items():
        row = state[key]
        is_new = key not in stored
        if row.data_json is None or (row.deleted and not is_new and row.data_json == stored[key].data_json):
            # Deleted with the content it had before the batch: a tombstone, its content not re-sent.
            final.writes.append(Write(key, None, None, row.source_updated_at, True, "deleted", is_new))
        else:
            final.writes.append(
                Write(key, row.data_json, row.data_hash, row.source_updated_at, row.deleted, last_action, is_new)
            )
    final.advance = [(key, state[key].source_updated_at) for key in advanced if key not in written]  # type: ignore[misc]
    return final
