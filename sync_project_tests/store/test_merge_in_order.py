"""Event-ordered batches (a webhook batch): one plan and one execution against the segments merged
one by one.

``RecordWriter.merge_in_order`` plans a whole batch over one read of its keys
(``merge.plan_in_order``); the reference here merges each segment (``merge.segments``) as its own
batch, one after another, in one transaction, as the drain did before. Random batches of saves,
partial updates and deletes over a few keys, on stored state of every kind (live, tombstone,
absent), under each strategy, must end in the same rows, the same counts and the same change-feed
entry, on both backends.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_project.core.clock import utcnow
from sync_project.store import MergeResult, RecordSpec, Store
from sync_project.store.merge import Step, prepare_batch, segments
from sync_project.store.records import PreparedBatch, RecordWriter
from sync_project.store.schema import feed_entries, records

from .helpers import CONN, MODIFIED_AFTER, NEWEST, OVERRIDE, contact, stamp

KEYS = ("a", "b", "c", "d")
SPECS = {"newest": NEWEST, "modified_after": MODIFIED_AFTER, "override": OVERRIDE}

# ("save", key, version) | ("update", key, version or None) | ("delete", key, version or None)
change = st.one_of(
    st.tuples(st.just("save"), st.sampled_from(KEYS), st.integers(0, 9)),
    st.tuples(st.just("update"), st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 9))),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 9))),
)
# What is stored before the batch, per key: nothing, a live record or a tombstone, at a version.
before = st.dictionaries(st.sampled_from(KEYS), st.tuples(st.booleans(), st.integers(0, 9)), max_size=len(KEYS))


def record_of(action: str, key: str, version: int | None) -> dict[str, Any]:
    if action == "save":
        assert version is not None
        return contact(key, version, nested={"n": version, "tag": "s"})
    patch: dict[str, Any] = {"id": key, "nested": {"patched": version}}
    if version is not None:
        patch["updated_at"] = stamp(version)
    return patch


def steps_of(spec: RecordSpec, changes: list[tuple[str, str, int | None]]) -> list[Step]:
    steps = []
    for action, key, version in changes:
        produced_at = utcnow()  # as a drain's handlers run: after the stored state was written
        (incoming,) = prepare_batch(action, [record_of(action, key, version)], spec, produced_at)  # type: ignore[arg-type]
        steps.append(Step(action, incoming, produced_at))  # type: ignore[arg-type]
    return steps


def one_by_one(writer: RecordWriter, steps: list[Step]) -> MergeResult:
    """The reference: each segment merged as its own batch, each dated no earlier than the end of
    the previous merge (the transaction's own writes never make its later changes stale)."""
    result = MergeResult()
    previous_end: datetime | None = None
    for fetched_at, batches in segments(steps, writer.spec):
        if previous_end is not None and previous_end > fetched_at:
            fetched_at = previous_end
        for action, items in batches.items():
            result += writer.merge(action, PreparedBatch(action, writer.spec, fetched_at, items))
        previous_end = utcnow()
    return result


def rows(store: Store, sync: str) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        found = conn.execute(
            sa.select(
                records.c.external_id,
                records.c.data,
                records.c.source_updated_at,
                records.c.deleted_at.is_not(None),
                records.c.last_action,
            )
            .where(records.c.sync == sync)
            .order_by(records.c.external_id)
        ).all()
    return [(key, json.loads(data), source, deleted, action) for key, data, source, deleted, action in found]


def last_feed_entry(store: Store, sync: str) -> tuple[list[str], int, int]:
    with store.engine.connect() as conn:
        entry = conn.execute(
            sa.select(feed_entries.c.external_ids, feed_entries.c.ids_listed, feed_entries.c.ids_superseded)
            .where(feed_entries.c.sync == sync)
            .order_by(feed_entries.c.modified_at.desc())
            .limit(1)
        ).first()
    if entry is None:
        return [], 0, 0
    return json.loads(entry[0]), entry[1], entry[2]


def fill(store: Store, sync: str, spec: RecordSpec, stored: dict[str, tuple[bool, int]]) -> None:
    with store.writer(sync, CONN, spec) as writer:
        writer.save([contact(key, version) for key, (_, version) in sorted(stored.items())], fetched_at=utcnow())
    gone = [{"id": key, "updated_at": stamp(version)} for key, (deleted, version) in sorted(stored.items()) if deleted]
    if gone:
        with store.writer(sync, CONN, spec) as writer:
            writer.delete(gone, fetched_at=utcnow() + timedelta(days=3650))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    strategy=st.sampled_from(sorted(SPECS)),
    stored=before,
    changes=st.lists(change, min_size=1, max_size=12),
)
def test_one_plan_for_an_ordered_batch_ends_as_its_segments_merged_one_by_one(
    store: Store, strategy: str, stored: dict[str, tuple[bool, int]], changes: list[tuple[str, str, int | None]]
) -> None:
    spec = SPECS[strategy]
    planned, reference = f"in-order/{uuid.uuid4().hex[:10]}", f"one-by-one/{uuid.uuid4().hex[:10]}"
    fill(store, planned, spec, stored)
    fill(store, reference, spec, stored)
    steps = steps_of(spec, changes)
    superseded_before = last_feed_entry(store, planned)[2]
    reference_before = last_feed_entry(store, reference)[2]

    with store.writer(planned, CONN, spec) as writer, writer.one_feed_entry():
        got = writer.merge_in_order(steps)
    with store.writer(reference, CONN, spec) as writer, writer.one_feed_entry():
        expected = one_by_one(writer, steps)

    assert got == expected
    assert rows(store, planned) == rows(store, reference)
    ids, listed, superseded = last_feed_entry(store, planned)
    assert (ids, listed) == last_feed_entry(store, reference)[:2]
    if not got.added + got.updated + got.deleted:
        return  # nothing written: the last entry is the stored state's
    # Superseded (a running total): the listed records that were stored (so listed before) when
    # the batch began, by the one plan and by the merges one by one alike (whose write-first saves
    # of a record the entry itself added once counted it one too few).
    listed_before = sum(1 for key in ids if key in stored)
    assert superseded - superseded_before == listed_before
    assert last_feed_entry(store, reference)[2] - reference_before == listed_before


def test_a_batch_of_one_action_on_distinct_keys_is_one_plain_merge() -> None:
    spec = NEWEST
    steps = steps_of(spec, [("save", "a", 1), ("save", "b", 1), ("save", "a", 2)])
    [(_, batches)] = segments(steps, spec)
    assert [(action, [item.key for item in items]) for action, items in batches.items()] == [("save", ["a", "b"])]
    assert json.loads(batches["save"][0].data_json)["version"] == 2  # the newest copy of a was kept


def test_a_key_under_another_action_starts_a_new_segment() -> None:
    spec = NEWEST
    steps = steps_of(spec, [("save", "a", 1), ("delete", "b", None), ("delete", "a", None), ("update", "b", 3)])
    cut = segments(steps, spec)
    assert [{action: [item.key for item in items] for action, items in batches.items()} for _, batches in cut] == [
        {"save": ["a"], "delete": ["b"]},
        {"update": ["b"], "delete": ["a"]},
    ]
    assert cut[0][0] <= cut[1][0]  # a later segment is never dated before an earlier one
