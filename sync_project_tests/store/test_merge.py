"""Merge semantics (DESIGN, "Merge semantics"), each on SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta, timezone

import pytest
from pydantic import BaseModel

from sync_project.core.clock import utcnow
from sync_project.store import InvalidBatchError, MergeResult, MergeStrategy, RecordSpec, Store, prepare

from .helpers import CONN, MODIFIED_AFTER, NEWEST, OVERRIDE, at, contact, stamp

SYNC = "crm/contacts"


def counts(result: MergeResult) -> dict[str, int]:
    return {name: value for name, value in result.as_dict().items() if value}


# -- save ---------------------------------------------------------------------------------------


def test_save_adds_then_updates_with_true_counts(store: Store) -> None:
    first = store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1)])
    assert counts(first) == {"added": 2}

    second = store.save(SYNC, CONN, NEWEST, [contact("a", 2), contact("b", 1), contact("c", 1)])
    assert counts(second) == {"added": 1, "updated": 1, "unchanged": 1}

    a = store.get(SYNC, CONN, "a")
    assert a is not None
    assert a.data == contact("a", 2)
    assert a.last_action == "updated"
    assert a.source_updated_at == at(2)
    assert a.first_seen_at < a.last_modified_at
    assert store.count(SYNC, CONN) == 3


def test_identical_content_is_a_no_op(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1, tags=["x"])])
    before = store.get(SYNC, CONN, "a")
    cursor = store.changes(SYNC, CONN).next_cursor

    # Same content, keys in another order: the canonical form is the same.
    again = dict(reversed(list(contact("a", 1, tags=["x"]).items())))
    result = store.save(SYNC, CONN, NEWEST, [again])

    assert counts(result) == {"unchanged": 1}
    after = store.get(SYNC, CONN, "a")
    assert after == before  # last_modified_at (and everything else) did not move
    assert store.changes(SYNC, CONN, cursor=cursor).records == []  # nothing new in the feed


def test_override_applies_stale_copies(store: Store) -> None:
    store.save(SYNC, CONN, OVERRIDE, [contact("a", 5)])
    result = store.save(SYNC, CONN, OVERRIDE, [contact("a", 3)], fetched_at=utcnow() - timedelta(hours=1))
    assert counts(result) == {"updated": 1}
    record = store.get(SYNC, CONN, "a")
    assert record is not None and record.data["version"] == 3


def test_newest_source_wins_skips_older_provider_versions(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 5), contact("b", 5)])

    result = store.save(SYNC, CONN, NEWEST, [contact("a", 4), contact("b", 6)])

    assert counts(result) == {"skipped_stale": 1, "updated": 1}
    a, b = store.get(SYNC, CONN, "a"), store.get(SYNC, CONN, "b")
    assert a is not None and a.data["version"] == 5 and a.source_updated_at == at(5)
    assert b is not None and b.data["version"] == 6


def test_newest_source_wins_compares_instants_not_text(store: Store) -> None:
    """The same instant in another zone or as epoch milliseconds is not newer."""
    store.save(SYNC, CONN, NEWEST, [contact("a", 10)])
    as_paris = at(10 - 1).astimezone(timezone(timedelta(hours=2))).isoformat()  # 1 s older, other zone
    as_epoch_ms = int(at(10 - 2).timestamp() * 1000)

    result = store.save(SYNC, CONN, NEWEST, [{**contact("a", 9), "updated_at": as_paris}])
    result += store.save(SYNC, CONN, NEWEST, [{**contact("a", 8), "updated_at": as_epoch_ms}])

    assert counts(result) == {"skipped_stale": 2}


def test_ignore_if_modified_after_skips_records_written_after_the_fetch(store: Store) -> None:
    fetched_at = utcnow()
    store.save(SYNC, CONN, MODIFIED_AFTER, [contact("a", 1), contact("b", 1)])  # before our "fetch" lands
    # A webhook run writes "a" after our poll read its copy.
    store.save(SYNC, CONN, MODIFIED_AFTER, [contact("a", 3)])

    result = store.save(
        SYNC, CONN, MODIFIED_AFTER, [contact("a", 2), contact("b", 2), contact("c", 2)], fetched_at=fetched_at
    )

    # "b" was also written after fetched_at (the first save), so the guard protects it too.
    assert counts(result) == {"skipped_stale": 2, "added": 1}
    late = store.save(SYNC, CONN, MODIFIED_AFTER, [contact("a", 2)], fetched_at=utcnow())
    assert counts(late) == {"updated": 1}  # fetched after the last write: applied, even though older


def test_duplicate_keys_in_one_batch_are_collapsed(store: Store) -> None:
    newest = store.save(SYNC, CONN, NEWEST, [contact("a", 3), contact("a", 7), contact("a", 5)])
    assert counts(newest) == {"added": 1}
    record = store.get(SYNC, CONN, "a")
    assert record is not None and record.data["version"] == 7

    last = store.save(SYNC, CONN, OVERRIDE, [contact("b", 3), contact("b", 7), contact("b", 5)])
    assert counts(last) == {"added": 1}
    record = store.get(SYNC, CONN, "b")
    assert record is not None and record.data["version"] == 5  # override: the last copy


def test_integer_keys_and_pydantic_models(store: Store) -> None:
    class Issue(BaseModel):
        number: int
        title: str

    spec = RecordSpec(primary_key="number")
    result = store.save("gh/issues", CONN, spec, [Issue(number=7, title="Crash"), {"number": 8, "title": "Slow"}])
    assert counts(result) == {"added": 2}
    record = store.get("gh/issues", CONN, "7")
    assert record is not None and record.data == {"number": 7, "title": "Crash"}


def test_syncs_and_connections_are_separate(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1)])
    store.save(SYNC, "other", NEWEST, [contact("a", 9)])
    store.save("crm/deals", CONN, NEWEST, [contact("a", 5)])

    result = store.save(SYNC, CONN, NEWEST, [contact("a", 2)])

    assert counts(result) == {"updated": 1}
    other = store.get(SYNC, "other", "a")
    assert other is not None and other.data["version"] == 9


# -- delete and tombstones ------------------------------------------------------------------


def test_delete_tombstones_and_keeps_last_content(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1)])

    result = store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(2)}])
    again = store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(3)}])

    assert counts(result) == {"deleted": 1}
    assert counts(again) == {"unchanged": 1}
    a = store.get(SYNC, CONN, "a")
    assert a is not None and a.deleted_at is not None and a.last_action == "deleted"
    assert a.data == contact("a", 1)  # what went away
    assert a.source_updated_at == at(3)  # the newest delete guards it
    assert store.count(SYNC, CONN) == 1
    assert store.count(SYNC, CONN, include_deleted=True) == 2


@pytest.mark.parametrize("spec", [NEWEST, MODIFIED_AFTER], ids=["newest_source_wins", "ignore_if_modified_after"])
def test_stale_copy_does_not_resurrect_a_tombstone(store: Store, spec: RecordSpec) -> None:
    fetched_before_delete = utcnow()
    store.save(SYNC, CONN, spec, [contact("a", 1)], fetched_at=fetched_before_delete)
    store.delete(SYNC, CONN, spec, [{"id": "a", "updated_at": stamp(2)}])

    # A poll that read version 1 before the delete writes it late.
    result = store.save(SYNC, CONN, spec, [contact("a", 1)], fetched_at=fetched_before_delete)

    assert counts(result) == {"skipped_stale": 1}
    a = store.get(SYNC, CONN, "a")
    assert a is not None and a.deleted_at is not None


def test_newer_copy_after_a_delete_brings_the_record_back(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(2)}])

    result = store.save(SYNC, CONN, NEWEST, [contact("a", 3)])  # restored at the provider

    assert counts(result) == {"added": 1}
    a = store.get(SYNC, CONN, "a")
    assert a is not None and a.deleted_at is None and a.last_action == "added" and a.data["version"] == 3


def test_delete_without_timestamp_guards_with_fetch_time(store: Store) -> None:
    """A delete event with no provider timestamp still beats copies the provider sent earlier."""
    store.save(SYNC, CONN, NEWEST, [contact("a", 1)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "a"}], fetched_at=at(100))

    stale = store.save(SYNC, CONN, NEWEST, [contact("a", 50)])
    fresh = store.save(SYNC, CONN, NEWEST, [contact("a", 150)])

    assert counts(stale) == {"skipped_stale": 1}
    assert counts(fresh) == {"added": 1}


def test_delete_of_an_unknown_key_leaves_a_tombstone(store: Store) -> None:
    result = store.delete(SYNC, CONN, NEWEST, [{"id": "ghost", "updated_at": stamp(5)}])
    late_copy = store.save(SYNC, CONN, NEWEST, [contact("ghost", 4)])

    assert counts(result) == {"deleted": 1}
    assert counts(late_copy) == {"skipped_stale": 1}
    assert store.count(SYNC, CONN) == 0


# -- partial updates ------------------------------------------------------------------------


def test_update_deep_merges_objects_and_replaces_arrays(store: Store) -> None:
    store.save(
        SYNC,
        CONN,
        NEWEST,
        [contact("a", 1, address={"city": "Oslo", "zip": "0150"}, tags=["x", "y"], phone="1")],
    )

    result = store.update(
        SYNC,
        CONN,
        NEWEST,
        [{"id": "a", "updated_at": stamp(2), "address": {"city": "Bergen"}, "tags": ["z"]}],
    )

    assert counts(result) == {"updated": 1}
    a = store.get(SYNC, CONN, "a")
    assert a is not None
    assert a.data["address"] == {"city": "Bergen", "zip": "0150"}
    assert a.data["tags"] == ["z"]
    assert a.data["phone"] == "1" and a.data["name"] == "a v1"
    assert a.source_updated_at == at(2)


def test_update_skips_unknown_and_deleted_ids(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("gone", 1)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "gone", "updated_at": stamp(2)}])

    result = store.update(
        SYNC, CONN, NEWEST, [{"id": "nobody", "name": "x"}, {"id": "gone", "name": "y"}, {"id": "a", "name": "a v1"}]
    )

    assert counts(result) == {"skipped_missing": 2, "unchanged": 1}
    assert store.get(SYNC, CONN, "nobody") is None
    gone = store.get(SYNC, CONN, "gone")
    assert gone is not None and gone.deleted_at is not None and gone.data["name"] == "gone v1"


def test_update_patches_in_one_batch_each_pass_the_guard(store: Store) -> None:
    """An old patch folded into a newer one must not slip past newest_source_wins."""
    store.save(SYNC, CONN, NEWEST, [contact("a", 5, color="red", size="S")])

    result = store.update(
        SYNC,
        CONN,
        NEWEST,
        [
            {"id": "a", "updated_at": stamp(7), "size": "L"},
            {"id": "a", "updated_at": stamp(3), "color": "blue"},  # older than what we have
            {"id": "a", "updated_at": stamp(6), "size": "M"},  # older than the patch before it
        ],
    )

    assert counts(result) == {"updated": 1}
    a = store.get(SYNC, CONN, "a")
    assert a is not None
    assert (a.data["color"], a.data["size"]) == ("red", "L")
    assert a.source_updated_at == at(7)


def test_stale_update_is_skipped(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 5)])
    result = store.update(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(4), "name": "old"}])
    assert counts(result) == {"skipped_stale": 1}


# -- full refresh delete detection ---------------------------------------------------------


@pytest.mark.parametrize("spec", [NEWEST, MODIFIED_AFTER], ids=["newest_source_wins", "ignore_if_modified_after"])
def test_delete_unseen_removes_only_unseen_records_not_modified_since_start(store: Store, spec: RecordSpec) -> None:
    store.save(SYNC, CONN, spec, [contact(k, 1) for k in ("kept", "same", "raced", "gone", "webhooked")])
    run_id, started_at = "run-1", utcnow()

    # The full refresh fetches pages; webhooks change "webhooked" and "raced" while it runs.
    with store.writer(SYNC, CONN, spec) as writer:
        page = writer.save([contact("kept", 2), contact("same", 1)], fetched_at=started_at, seen_by_run=run_id)
    store.save(SYNC, CONN, spec, [contact("webhooked", 9), contact("raced", 9)])
    with store.writer(SYNC, CONN, spec) as writer:
        # The poll read "raced" before the webhook wrote it: its copy loses, the key was still seen.
        raced = writer.save([contact("raced", 1)], fetched_at=started_at, seen_by_run=run_id)
        deleted = writer.delete_unseen(run_id, started_at)

    assert counts(page) == {"updated": 1, "unchanged": 1}
    assert counts(raced) == {"skipped_stale": 1}
    assert deleted == 1
    live = {record.id for record in store.changes(SYNC, CONN, actions=["added", "updated"]).records}
    assert live == {"kept", "same", "raced", "webhooked"}
    gone = store.get(SYNC, CONN, "gone")
    assert gone is not None and gone.deleted_at is not None and gone.last_action == "deleted"
    # Absence is weak evidence: the tombstone keeps the provider version last seen alive.
    assert gone.source_updated_at == at(1)


@pytest.mark.parametrize(
    "spec", [NEWEST, MODIFIED_AFTER, OVERRIDE], ids=["newest_source_wins", "ignore_if_modified_after", "override"]
)
def test_a_wrongly_inferred_tombstone_is_restored_by_the_next_full_refresh(store: Store, spec: RecordSpec) -> None:
    """A full refresh that saw nothing (a lost lease, a provider answering empty pages) tombstones
    every record; the next full refresh that returns them brings every one back, unchanged."""
    truth = [contact(f"c{n}", 1 + n % 3) for n in range(40)]
    store.save(SYNC, CONN, spec, truth)
    with store.writer(SYNC, CONN, spec) as writer:
        assert writer.delete_unseen("run-blind", utcnow()) == 40
    assert store.count(SYNC, CONN) == 0

    started = utcnow()
    with store.writer(SYNC, CONN, spec) as writer:
        restored = writer.save(truth, fetched_at=started, seen_by_run="run-next")
        assert writer.delete_unseen("run-next", started) == 0

    assert counts(restored) == {"added": 40}
    assert store.count(SYNC, CONN) == 40
    for record in truth:
        stored = store.get(SYNC, CONN, record["id"])
        assert stored is not None and stored.deleted_at is None and stored.data == record


def test_an_inferred_tombstone_still_refuses_copies_older_than_the_last_live_one(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 5), contact("b", 5)])
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.delete_unseen("run-1", utcnow())

    stale = store.save(SYNC, CONN, NEWEST, [contact("a", 4)])  # a late webhook of an older version
    seen_again = store.save(SYNC, CONN, NEWEST, [contact("b", 5)])  # the next poll returns b as it was

    assert counts(stale) == {"skipped_stale": 1}
    assert store.get(SYNC, CONN, "a").deleted_at is not None  # type: ignore[union-attr]
    assert counts(seen_again) == {"added": 1}
    assert store.get(SYNC, CONN, "b").deleted_at is None  # type: ignore[union-attr]


def test_a_provider_dated_delete_is_strong_only_a_newer_copy_revives_it(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 5)])
    assert counts(store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(7)}])) == {"deleted": 1}

    # The record as the last poll saw it, and as a full refresh that raced the delete saw it.
    assert counts(store.save(SYNC, CONN, NEWEST, [contact("a", 5)])) == {"skipped_stale": 1}
    assert counts(store.save(SYNC, CONN, NEWEST, [contact("a", 6)])) == {"skipped_stale": 1}
    assert store.get(SYNC, CONN, "a").deleted_at is not None  # type: ignore[union-attr]
    assert counts(store.save(SYNC, CONN, NEWEST, [contact("a", 8)])) == {"added": 1}


def test_a_failed_full_refresh_deletes_nothing(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1)])
    started_at = utcnow()
    with pytest.raises(RuntimeError, match="fetch failed"):
        with store.writer(SYNC, CONN, NEWEST) as writer:
            writer.save([contact("a", 2)], fetched_at=started_at, seen_by_run="run-2")
            writer.delete_unseen("run-2", started_at)
            raise RuntimeError("fetch failed on page 2")

    assert store.count(SYNC, CONN) == 2
    a = store.get(SYNC, CONN, "a")
    assert a is not None and a.data["version"] == 1  # the whole transaction rolled back


# -- checkpoints commit with the records -----------------------------------------------------


def test_checkpoint_commits_atomically_with_the_batch(store: Store) -> None:
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.save([contact("a", 1)])
        writer.set_checkpoint({"cursor": "page-2"})
    state = store.state.get(SYNC, CONN)
    assert state is not None and state.checkpoint == {"cursor": "page-2"}

    with pytest.raises(KeyError):
        with store.writer(SYNC, CONN, NEWEST) as writer:
            writer.save([contact("a", 2)])
            writer.set_checkpoint({"cursor": "page-3"})
            raise KeyError("crash before commit")

    state = store.state.get(SYNC, CONN)
    assert state is not None and state.checkpoint == {"cursor": "page-2"}
    a = store.get(SYNC, CONN, "a")
    assert a is not None and a.data["version"] == 1


def test_many_pages_in_one_writer(store: Store) -> None:
    """More keys than one statement chunk, in one transaction, with every count right."""
    spec = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
    batch = [contact(f"k{i:05d}", 1) for i in range(12_000)]
    with store.writer(SYNC, CONN, spec) as writer:
        first = writer.save(batch)
        second = writer.save([contact(f"k{i:05d}", 2 if i % 2 else 1) for i in range(12_000)])
    assert counts(first) == {"added": 12_000}
    assert counts(second) == {"updated": 6_000, "unchanged": 6_000}
    assert store.count(SYNC, CONN) == 12_000


def test_each_merge_of_one_writer_writes_only_its_own_batch(store: Store) -> None:
    """Merges in one transaction share whatever the backend stages rows in: none may see another's.

    A webhook batch makes several small merges in one transaction; if a later one also wrote what an
    earlier one staged, the delete below would be undone by the last save.
    """
    with store.writer(SYNC, CONN, NEWEST) as writer:
        assert counts(writer.save([contact("a", 1)])) == {"added": 1}
        assert counts(writer.save([contact("b", 1)])) == {"added": 1}
        assert counts(writer.delete([{"id": "a", "updated_at": stamp(2)}])) == {"deleted": 1}
        assert counts(writer.save([contact("c", 1)])) == {"added": 1}
    a, b, c = (store.get(SYNC, CONN, key) for key in "abc")
    assert a is not None and a.deleted_at is not None and a.last_action == "deleted"
    assert b is not None and b.data == contact("b", 1)
    assert c is not None and c.data == contact("c", 1)
    assert store.count(SYNC, CONN) == 2


def test_a_newer_delete_of_a_tombstone_moves_its_guard_but_not_the_feed(store: Store) -> None:
    """Found by the property test: a second, newer delete used to leave the tombstone at the
    first delete's time, so a copy between the two could resurrect the record."""
    store.save(SYNC, CONN, NEWEST, [contact("a", 1)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(4)}])
    tombstone = store.get(SYNC, CONN, "a")

    again = store.delete(SYNC, CONN, NEWEST, [{"id": "a", "updated_at": stamp(8)}])
    stale = store.save(SYNC, CONN, NEWEST, [contact("a", 6)])  # restored at 6, deleted again at 8

    assert counts(again) == {"unchanged": 1}
    assert counts(stale) == {"skipped_stale": 1}
    a = store.get(SYNC, CONN, "a")
    assert tombstone is not None and a is not None
    assert a.deleted_at is not None and a.source_updated_at == at(8)
    assert a.last_modified_at == tombstone.last_modified_at  # no new change in the feed


ODD_KEYS = ["tab\there", "new\nline", "back\\slash", "quote'\"s", "ünïcødé", "emoji 😀", "%s %(x)s", "\\N", "a,b", " "]


def test_keys_and_values_with_special_characters_round_trip(store: Store) -> None:
    """The bulk paths (COPY text, JSON key arrays, executemany) must not mangle any character."""
    records = [contact(key, 1, note=f"{key} \\ \t \n \u2028 end") for key in ODD_KEYS]
    assert counts(store.save(SYNC, CONN, NEWEST, records)) == {"added": len(ODD_KEYS)}
    assert counts(store.save(SYNC, CONN, NEWEST, records)) == {"unchanged": len(ODD_KEYS)}
    for record in records:
        stored = store.get(SYNC, CONN, record["id"])
        assert stored is not None and stored.data == record

    update = store.update(SYNC, CONN, NEWEST, [{"id": key, "updated_at": stamp(2), "seen": True} for key in ODD_KEYS])
    deleted = store.delete(SYNC, CONN, NEWEST, [{"id": key, "updated_at": stamp(3)} for key in ODD_KEYS[:3]])
    store.save(SYNC, CONN, NEWEST, [contact(key, 4) for key in ODD_KEYS[3:6]])
    with store.writer(SYNC, CONN, NEWEST) as writer:
        started = utcnow()
        # Unchanged, so only marked as seen (the UPDATE that locates rows by key).
        marked = writer.save([contact(key, 4) for key in ODD_KEYS[3:6]], seen_by_run="run-odd")
        unseen = writer.delete_unseen("run-odd", started)

    assert counts(update) == {"updated": len(ODD_KEYS)}
    assert counts(deleted) == {"deleted": 3}
    assert counts(marked) == {"unchanged": 3}
    assert unseen == len(ODD_KEYS) - 6
    live = {c.id for c in store.changes(SYNC, CONN, limit=100).records if c.deleted_at is None}
    assert live == set(ODD_KEYS[3:6])


# -- prepared batches (validated and encoded before the transaction) ---------------------------


def test_a_prepared_batch_merges_exactly_as_its_records_would(store: Store) -> None:
    fetched_at = utcnow()
    batch = [contact("a", 2), contact("b", 1), contact("a", 1)]  # "a" twice: the newest copy wins
    store.save(SYNC, CONN, NEWEST, [contact("b", 1)])
    prepared = prepare("save", batch, NEWEST, fetched_at=fetched_at)
    assert [item.key for item in prepared.items] == ["a", "b"]

    with store.writer(SYNC, CONN, NEWEST) as writer:
        result = writer.save(prepared)
    assert counts(result) == {"added": 1, "unchanged": 1}
    assert store.get(SYNC, CONN, "a").data == contact("a", 2)

    deletes = prepare("delete", [{"id": "b"}], NEWEST, fetched_at=fetched_at)
    with store.writer(SYNC, CONN, NEWEST) as writer:
        assert counts(writer.delete(deletes)) == {"deleted": 1}
    gone = store.get(SYNC, CONN, "b")
    assert gone.deleted_at is not None and gone.source_updated_at == fetched_at  # the batch's fetched_at


def test_a_bad_record_fails_when_prepared_before_any_transaction() -> None:
    with pytest.raises(InvalidBatchError, match="no usable primary key"):
        prepare("save", [contact("a", 1), {"name": "no id"}], NEWEST)


@pytest.mark.parametrize(
    ("action", "spec", "extra", "problem"),
    [
        ("delete", NEWEST, {}, "prepared for 'save' cannot be merged as 'delete'"),
        ("save", OVERRIDE, {}, "cannot be merged under"),
        ("save", NEWEST, {"fetched_at": utcnow()}, "carries its fetched_at"),
    ],
)
def test_a_prepared_batch_merges_only_as_what_it_was_prepared_for(
    store: Store, action: str, spec: RecordSpec, extra: dict, problem: str
) -> None:
    prepared = prepare("save", [contact("a", 1)], NEWEST)
    with pytest.raises(InvalidBatchError, match=problem):
        with store.writer(SYNC, CONN, spec) as writer:
            writer.merge(action, prepared, **extra)
    assert store.count(SYNC, CONN) == 0
