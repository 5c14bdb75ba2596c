"""The dlt comparison's workload and sync_project's side of it, on a small dataset (no timing).

dlt itself is a benchmark-only extra, so its side runs only in ``make bench``; here we check that
both sides are handed the same rows and that the store's loads end in the state the checks expect.
Each test merges under a sync name of its own: the store's batch lock is a Postgres advisory lock,
which is database-wide, so a benchmark running on the same server with the benchmark's sync name
would otherwise make these tests wait for it.
"""

from __future__ import annotations

import uuid

import dlt_merge
import pytest
import sqlalchemy as sa

from sync_project.store import Store


def _sync() -> str:
    return f"bench/test-{uuid.uuid4().hex[:12]}"


def _flatten(load: dlt_merge.Load) -> list[dict]:
    rows = []
    for records, deletes in load.pages:
        rows += records + [{**marker, dlt_merge.DELETED_COLUMN: True} for marker in deletes]
    return rows


def test_both_sides_get_the_same_rows() -> None:
    workload = dlt_merge.build_workload(1000)
    initial, *rounds, refresh = workload.loads
    assert _flatten(initial) == initial.dlt_rows and initial.source_records == 1000
    assert [load.round_number for load in rounds] == list(range(1, dlt_merge.CHANGE_ROUNDS + 1))
    assert len({load.name for load in rounds}) == 1  # rounds of one case, one figure
    live = 1000
    for changes in rounds:
        assert sorted(_flatten(changes), key=lambda r: r["id"]) == sorted(changes.dlt_rows, key=lambda r: r["id"])
        assert changes.source_records == 200 + 10
        assert sum(1 for r in changes.dlt_rows if r.get(dlt_merge.DELETED_COLUMN)) == 10
        live -= 10
        assert len(changes.expected) == live
        # Each round changes and deletes only records still live after the previous one.
        before = initial.expected if changes.round_number == 1 else rounds[changes.round_number - 2].expected
        assert {r["id"] for r in changes.dlt_rows} <= before.keys()
        assert sum(1 for key, at in changes.expected.items() if before[key] != at) == 200
    # The full refresh: sync_project sees only the survivors; dlt is also told what vanished.
    assert [r for r in refresh.dlt_rows if not r.get(dlt_merge.DELETED_COLUMN)] == _flatten(refresh)
    assert refresh.source_records == live and len(refresh.expected) == live - 10
    assert refresh.full_refresh and not refresh.has_target


def test_pages_hold_at_most_a_page_of_source_rows() -> None:
    for load in dlt_merge.build_workload(12_000).loads:
        assert all(len(records) + len(deletes) <= dlt_merge.PAGE_SIZE for records, deletes in load.pages)


def test_store_loads_end_in_the_expected_state(store: Store) -> None:
    workload, sync = dlt_merge.build_workload(1000), _sync()
    for load in workload.loads:
        dlt_merge.load_with_store(store, load, sync=sync)
        dlt_merge.check_store(store.engine, load, sync=sync)  # raises on any difference
    assert store.count(sync, dlt_merge.CONNECTION) == 1000 - 10 * (dlt_merge.CHANGE_ROUNDS + 1)


def test_the_check_catches_a_wrong_state(store: Store) -> None:
    initial, sync = dlt_merge.build_workload(1000).loads[0], _sync()
    dlt_merge.load_with_store(store, initial, sync=sync)
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM records WHERE external_id = :key"), {"key": initial.dlt_rows[0]["id"]})
    with pytest.raises(RuntimeError, match="1 records missing"):
        dlt_merge.check_store(store.engine, initial, sync=sync)


def test_store_keeps_the_newest_version_when_a_stale_batch_comes_last(store: Store) -> None:
    assert dlt_merge.stale_case_store(store, sync=_sync()) == dlt_merge.STALE_NEWEST
