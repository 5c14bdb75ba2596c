"""Saves that write first (``PostgresBulk.save_unread``) against saves that read first.

The two are the two executions of one plan: ``merge.plan_batch`` in Python and the guarded
upsert's SQL, whose guard is rendered from the same declaration (``merge.GUARDS``). Hypothesis builds stored states (absent, live, tombstoned, with and without a provider
timestamp, same or other content) and a batch over them; each example is saved both ways into two
syncs holding the same state, and everything a user can see must come out the same: the records,
the counts, the change feed and the seen marks of a full refresh.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_project.core.clock import utcnow
from sync_project.store import MergeResult, RecordSpec, Store
from sync_project.store.bulk import PostgresBulk
from sync_project.store.records import RecordWriter, WriteHints
from sync_project.store.schema import records

from .helpers import CONN, MODIFIED_AFTER, NEWEST, OVERRIDE, contact

KEYS = ("k0", "k1", "k2", "k3", "k4")
#: Written with this spec, a record has no provider timestamp (a model without updated_field).
UNTIMED = RecordSpec(primary_key="id")


class Fixed(WriteHints):
    """Hints that always answer the same, to force one path."""

    def __init__(self, write_first: bool) -> None:
        super().__init__()
        self._answer = write_first

    def write_first(self, sync: str, connection_id: str) -> bool:
        return self._answer


# Per key, what the store holds before the batch: nothing, a live record at a version (of one of
# two contents, timed or not), or a tombstone at a version.
stored_state = st.one_of(
    st.just(None),
    st.tuples(st.just("live"), st.integers(1, 4), st.sampled_from(["a", "b"]), st.booleans()),
    st.tuples(st.just("deleted"), st.integers(1, 4)),
)
# Per key, what the batch carries: nothing, or a version of one of the two contents.
incoming = st.one_of(st.just(None), st.tuples(st.integers(1, 4), st.sampled_from(["a", "b"])))
cases = st.fixed_dictionaries(
    {
        "stored": st.fixed_dictionaries({key: stored_state for key in KEYS}),
        "batch": st.fixed_dictionaries({key: incoming for key in KEYS}),
        "spec": st.sampled_from([NEWEST, MODIFIED_AFTER, OVERRIDE]),
        # ignore_if_modified_after: fetched before the stored writes, or after them.
        "fetched_early": st.booleans(),
        "full_refresh": st.booleans(),
    }
)


def _seed(store: Store, sync: str, stored: dict[str, Any]) -> None:
    for key, state in stored.items():
        if state is None:
            continue
        if state[0] == "live":
            _, version, content, timed = state
            store.save(sync, CONN, NEWEST if timed else UNTIMED, [contact(key, version, colour=content)])
        else:
            _, version = state
            store.save(sync, CONN, NEWEST, [contact(key, version)])
            store.delete(sync, CONN, NEWEST, [contact(key, version)])


def _save(
    store: Store,
    sync: str,
    batch: list[dict[str, Any]],
    spec: RecordSpec,
    fetched_at: datetime,
    run: str | None,
    *,
    write_first: bool,
) -> MergeResult:
    with store.engine.begin() as conn:
        writer = RecordWriter(conn, sync, CONN, spec, hints=Fixed(write_first))
        return writer.save(batch, fetched_at=fetched_at, seen_by_run=run)


def _visible(store: Store, sync: str, cut: datetime) -> dict[str, tuple[Any, ...]]:
    """Each record as a user sees it, with its stamps reduced to what this save did to them."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(records).where(records.c.sync == sync)).mappings().all()
    return {
        row["external_id"]: (
            row["data"],
            row["data_hash"],
            row["source_updated_at"],
            row["deleted_at"] is None,
            row["last_action"],
            row["seen_by_run"],
            row["last_modified_at"] > cut,  # written by this save
            row["first_seen_at"] > cut,  # first seen by this save
        )
        for row in rows
    }


def _feed_after(store: Store, sync: str, cursor: str | None) -> list[tuple[str, str]]:
    page = store.changes(sync, CONN, cursor=cursor, limit=100)
    return sorted((change.id, change.last_action) for change in page.records)


def _feed_cursor(store: Store, sync: str) -> str | None:
    page = store.changes(sync, CONN, limit=100)
    return page.next_cursor


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_writing_first_does_exactly_what_reading_first_does(postgres_url: str, case: dict[str, Any]) -> None:
    """Postgres only: SQLite always reads first (see ``WriteHints``)."""
    with Store(postgres_url) as store:
        _compare_both_ways(store, case)


def _compare_both_ways(store: Store, case: dict[str, Any]) -> None:
    spec: RecordSpec = case["spec"]
    syncs = {way: f"wf/{way}/{uuid.uuid4().hex[:10]}" for way in ("read", "write")}
    early = utcnow()
    for sync in syncs.values():
        _seed(store, sync, case["stored"])
    fetched_at = early if case["fetched_early"] else utcnow()
    batch = [contact(key, version, colour=content) for key, (version, content) in _present(case["batch"])]
    run = uuid.uuid4().hex if case["full_refresh"] else None
    cuts = {way: utcnow() for way in syncs}
    cursors = {way: _feed_cursor(store, sync) for way, sync in syncs.items()}
    results = {
        way: _save(store, sync, batch, spec, fetched_at, run, write_first=way == "write") for way, sync in syncs.items()
    }
    assert results["write"] == results["read"]
    assert _visible(store, syncs["write"], cuts["write"]) == _visible(store, syncs["read"], cuts["read"])
    assert _feed_after(store, syncs["write"], cursors["write"]) == _feed_after(store, syncs["read"], cursors["read"])


def _present(batch: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in batch.items() if value is not None]


def test_a_store_writes_first_after_a_page_that_was_mostly_written(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = PostgresBulk._save_unread

    def counted(self: PostgresBulk, items: Any, *args: Any) -> Any:
        calls.append(len(items))
        return real(self, items, *args)

    monkeypatch.setattr(PostgresBulk, "_save_unread", counted)
    with Store(postgres_url) as store:
        sync = "wf/adaptive"
        first = [contact(f"c{i}", 1) for i in range(10)]
        assert store.save(sync, CONN, NEWEST, first).added == 10
        assert calls == []  # nothing known about this sync yet: read first
        changed = [contact(f"c{i}", 2) for i in range(10)]
        result = store.save(sync, CONN, NEWEST, changed)
        assert (result.updated, calls) == (10, [10])  # the last page was all new: write first
        assert store.save(sync, CONN, NEWEST, changed).unchanged == 10
        assert calls == [10, 10]  # the last page was all written: this one wrote first too
        store.save(sync, CONN, NEWEST, changed)
        assert calls == [10, 10]  # the last one wrote nothing: read first again
        assert store.save("wf/other", CONN, NEWEST, first).added == 10
        assert calls == [10, 10]  # hints are per (sync, connection)


def test_a_write_first_save_counts_what_it_left(postgres_url: str) -> None:
    with Store(postgres_url) as store:
        sync = "wf/counts"
        store.save(sync, CONN, NEWEST, [contact("same", 1), contact("newer", 3), contact("gone", 1)])
        store.delete(sync, CONN, NEWEST, [contact("gone", 2)])
        batch = [contact("same", 1), contact("newer", 2), contact("gone", 3), contact("new", 1)]
        result = _save(store, sync, batch, NEWEST, utcnow(), None, write_first=True)
        assert result == MergeResult(added=2, unchanged=1, skipped_stale=1)
        restored, newer = store.get(sync, CONN, "gone"), store.get(sync, CONN, "newer")
        assert restored is not None and restored.deleted_at is None and restored.last_action == "added"
        assert restored.data == contact("gone", 3)
        assert newer is not None and newer.data == contact("newer", 3)


def test_write_hints_follow_the_last_page_and_stay_bounded() -> None:
    hints = WriteHints()
    assert not hints.write_first("s", "c")
    hints.observe("s", "c", keys=100, written=50)
    assert hints.write_first("s", "c") and not hints.write_first("s", "other")
    hints.observe("s", "c", keys=100, written=49)
    assert not hints.write_first("s", "c")
    for index in range(WriteHints._LIMIT + 1):
        hints.observe("s", f"c{index}", keys=1, written=1)
    assert len(hints._mostly_written) <= WriteHints._LIMIT


def _has_statistics(store: Store) -> bool:
    with store.engine.connect() as conn:
        return bool(
            conn.exec_driver_sql(
                "SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = current_schema() AND tablename = 'records' AND attname = 'sync')"
            ).scalar()
        )


def test_a_first_load_that_writes_first_still_gathers_statistics_early(postgres_url: str) -> None:
    """The page reads need statistics (see ``bulk.ensure_statistics``). A load whose pages write
    first has no read until its end; it must not leave the table unanalyzed until then."""
    with Store(postgres_url) as store:
        sync = "wf/statistics"
        store.save(sync, CONN, NEWEST, [contact(f"s{i}", 1) for i in range(100)])  # an empty table: nothing to analyze
        assert not _has_statistics(store)
        _save(store, sync, [contact(f"s{i}", 1) for i in range(100, 200)], NEWEST, utcnow(), None, write_first=True)
        assert _has_statistics(store)
