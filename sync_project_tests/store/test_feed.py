"""The change feed (keyset pages, opaque cursor, filters) and DataFrame reads, on both backends."""

from __future__ import annotations

import base64
import json
import random
import threading
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from sync_project.core.clock import utcnow
from sync_project.store import InvalidCursorError, Store, feed
from sync_project.store.schema import feed_entries

from .helpers import CONN, NEWEST, contact, stamp

SYNC = "crm/contacts"


def read_all(store: Store, **filters: Any) -> list[Any]:
    changes, cursor = [], None
    while True:
        page = store.changes(SYNC, CONN, cursor=cursor, limit=2, **filters)
        changes.extend(page.records)
        cursor = page.next_cursor
        if not page.has_more:
            return changes


def test_feed_is_ordered_by_modification_then_id(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("c", 1), contact("a", 1), contact("b", 1)])
    store.save(SYNC, CONN, NEWEST, [contact("a", 2)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "b", "updated_at": stamp(3)}])

    changes = read_all(store)

    assert [(c.id, c.last_action) for c in changes] == [("c", "added"), ("a", "updated"), ("b", "deleted")]
    stamps = [(c.last_modified_at, c.id) for c in changes]
    assert stamps == sorted(stamps)


def test_pages_resume_from_an_opaque_cursor(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact(f"k{i}", 1) for i in range(5)])

    first = store.changes(SYNC, CONN, limit=2)
    second = store.changes(SYNC, CONN, cursor=first.next_cursor, limit=2)
    third = store.changes(SYNC, CONN, cursor=second.next_cursor, limit=2)
    after = store.changes(SYNC, CONN, cursor=third.next_cursor, limit=2)

    assert [c.id for c in first.records + second.records + third.records] == [f"k{i}" for i in range(5)]
    assert (first.has_more, second.has_more, third.has_more) == (True, True, False)
    assert after.records == [] and not after.has_more
    # The last cursor is kept on an empty page, so a consumer can poll for news with it.
    assert after.next_cursor == third.next_cursor
    # Opaque and URL-safe: no plain timestamp (its ':' and '+' would show). Not "the id is absent":
    # a short id like "k1" can turn up by chance inside base64 text (it did, in CI).
    assert first.next_cursor is not None
    assert all(ch.isalnum() or ch in "-_" for ch in first.next_cursor)

    store.save(SYNC, CONN, NEWEST, [contact("k0", 2)])
    news = store.changes(SYNC, CONN, cursor=after.next_cursor)
    assert [c.id for c in news.records] == ["k0"]


def test_filters_by_action_and_modified_after(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1), contact("b", 1), contact("c", 1)])
    middle = utcnow()
    store.save(SYNC, CONN, NEWEST, [contact("a", 2), contact("d", 1)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "b", "updated_at": stamp(2)}])

    assert {c.id for c in read_all(store, actions=["deleted"])} == {"b"}
    assert {c.id for c in read_all(store, actions=["added"])} == {"c", "d"}
    assert {c.id for c in read_all(store, actions=["added", "updated"])} == {"a", "c", "d"}
    assert {c.id for c in read_all(store, modified_after=middle)} == {"a", "b", "d"}
    assert {c.id for c in read_all(store, modified_after=middle, actions=["added"])} == {"d"}


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        base64.urlsafe_b64encode(b"[1, 2, 3]").decode(),
        base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00", "a"]).encode()).decode(),  # naive
        base64.urlsafe_b64encode(json.dumps(["yesterday", "a"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00+00:00", 5]).encode()).decode(),
    ],
)
def test_invalid_cursor_is_a_clear_error(store: Store, cursor: str) -> None:
    with pytest.raises(InvalidCursorError, match="invalid cursor"):
        store.changes(SYNC, CONN, cursor=cursor)


def test_invalid_limit_and_action_filter_are_errors(store: Store) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.changes(SYNC, CONN, limit=0)
    with pytest.raises(ValueError, match="unknown action"):
        store.changes(SYNC, CONN, actions=["created"])  # type: ignore[list-item]


@pytest.fixture(params=["entries kept", "compacting often"])
def compaction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Feed guarantees hold whether the writers compact the feed entries meanwhile or not."""
    if request.param == "compacting often":
        monkeypatch.setattr(feed, "COMPACT_MIN_SUPERSEDED", 2)
    return str(request.param)


def feed_rows(store: Store) -> list[tuple[Any, list[str], int, int]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                feed_entries.c.modified_at,
                feed_entries.c.external_ids,
                feed_entries.c.ids_listed,
                feed_entries.c.ids_superseded,
            )
            .where(feed_entries.c.sync == SYNC)
            .order_by(feed_entries.c.modified_at)
        ).all()
    return [(at_, sorted(json.loads(ids)), listed, superseded) for at_, ids, listed, superseded in rows]


def test_each_write_is_one_feed_entry_and_compaction_keeps_only_current_ids(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed, "COMPACT_MIN_SUPERSEDED", 4)
    store.save(SYNC, CONN, NEWEST, [contact(k, 1) for k in "abcde"])
    store.save(SYNC, CONN, NEWEST, [contact(k, 2) for k in "ab"] + [contact("f", 1)])
    before = store.changes(SYNC, CONN, limit=2)  # a cursor handed out before compacting
    assert [c.id for c in before.records] == ["c", "d"]
    entries = feed_rows(store)
    assert [(ids, listed, superseded) for _, ids, listed, superseded in entries] == [
        (list("abcde"), 5, 0),
        (list("abf"), 8, 2),
    ]

    # 3 more superseded: 5 of 11 listed, under half: no compaction yet.
    store.delete(SYNC, CONN, NEWEST, [{"id": k, "updated_at": stamp(3)} for k in "abc"])
    assert [(listed, superseded) for *_, listed, superseded in feed_rows(store)][-1] == (11, 5)
    # 1 more: 6 of 12, half: the entries are rewritten to list each record once, at its stamp.
    store.save(SYNC, CONN, NEWEST, [contact("d", 2)])
    after = feed_rows(store)
    assert [(ids, listed, superseded) for _, ids, listed, superseded in after] == [
        (["e"], 6, 0),
        (["f"], 6, 0),
        (list("abc"), 6, 0),
        (["d"], 6, 0),
    ]
    assert [at_ for at_, *_ in after] == [entries[0][0], entries[1][0], *[at_ for at_, *_ in after[2:]]]

    changes = read_all(store)
    assert [(c.id, c.last_action) for c in changes] == [
        ("e", "added"),
        ("f", "added"),
        ("a", "deleted"),
        ("b", "deleted"),
        ("c", "deleted"),
        ("d", "updated"),
    ]
    resumed = store.changes(SYNC, CONN, cursor=before.next_cursor, limit=100)
    assert [c.id for c in resumed.records] == ["e", "f", "a", "b", "c", "d"]  # d again: it changed since


def test_delete_detection_enters_the_feed(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact(k, 1) for k in "abc"])
    page = store.changes(SYNC, CONN)
    started = utcnow()
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.save([contact("a", 1)], seen_by_run="run-1")
        assert writer.delete_unseen("run-1", started) == 2

    news = store.changes(SYNC, CONN, cursor=page.next_cursor)
    assert [(c.id, c.last_action) for c in news.records] == [("b", "deleted"), ("c", "deleted")]


def test_paging_while_a_writer_changes_records_misses_nothing(store: Store, compaction: str) -> None:
    """Writes land between the consumer's page reads: records it already passed, records
    ahead of it, new ones and deletes. Upserting by id, the consumer ends with every final
    version."""
    rng = random.Random(20240501)
    keys = [f"k{i:02d}" for i in range(30)]
    versions = dict.fromkeys(keys, 1)
    store.save(SYNC, CONN, NEWEST, [contact(k, 1) for k in keys])

    seen: dict[str, tuple[dict[str, Any], bool]] = {}
    cursor, rounds = None, 0
    while True:
        page = store.changes(SYNC, CONN, cursor=cursor, limit=4)
        for change in page.records:
            seen[change.id] = (change.data, change.deleted_at is not None)
        cursor = page.next_cursor
        rounds += 1
        if rounds <= 12:
            touched = rng.sample(keys, 5)
            for key in touched[:4]:
                versions[key] += 1
            store.save(SYNC, CONN, NEWEST, [contact(k, versions[k]) for k in touched[:4]])
            victim = touched[4]
            versions[victim] += 1
            store.delete(SYNC, CONN, NEWEST, [{"id": victim, "updated_at": stamp(versions[victim])}])
            new_key = f"n{rounds:02d}"
            keys.append(new_key)
            versions[new_key] = 1
            store.save(SYNC, CONN, NEWEST, [contact(new_key, 1)])
        elif not page.has_more:
            break

    final = {c.id: (c.data, c.deleted_at is not None) for c in read_all(store)}
    assert seen == final
    assert len(final) == 42


def test_paging_alongside_a_writer_thread_misses_nothing(store: Store, compaction: str) -> None:
    """The same guarantee with a real concurrent writer (another connection, its own thread)."""
    keys = [f"k{i:02d}" for i in range(20)]
    store.save(SYNC, CONN, NEWEST, [contact(k, 1) for k in keys])
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for version in range(2, 40):
                store.save(SYNC, CONN, NEWEST, [contact(k, version) for k in keys[version % 5 :: 5]])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen: dict[str, int] = {}
    cursor = None
    while True:
        finished = done.is_set()  # read before the page: a page after this sees all writes
        page = store.changes(SYNC, CONN, cursor=cursor, limit=3)
        seen.update({c.id: c.data["version"] for c in page.records})
        cursor = page.next_cursor
        if finished and not page.has_more:
            break
    writer.join()

    assert not errors
    assert seen == {c.id: c.data["version"] for c in read_all(store)}


def test_dataframe_has_fields_and_metadata(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact("a", 1, score=1.5), contact("b", 1, score=2.0)])
    store.save(SYNC, "other", NEWEST, [contact("z", 1, score=9.0)])
    store.delete(SYNC, CONN, NEWEST, [{"id": "b", "updated_at": stamp(2)}])

    frame = store.dataframe(SYNC, CONN)
    everything = store.dataframe(SYNC, CONN, include_deleted=True)
    all_connections = store.dataframe(SYNC)

    assert list(frame["id"]) == ["a"]
    assert frame.loc[0, "score"] == 1.5 and frame.loc[0, "name"] == "a v1"
    assert frame.loc[0, "_connection_id"] == CONN and frame.loc[0, "_last_action"] == "added"
    assert isinstance(frame["_last_modified_at"].dtype, pd.DatetimeTZDtype)
    assert pd.isna(frame.loc[0, "_deleted_at"])
    assert sorted(everything["_id"]) == ["a", "b"]
    assert everything.set_index("_id").loc["b", "_last_action"] == "deleted"
    assert sorted(all_connections["_id"]) == ["a", "z"]


def test_dataframe_of_an_empty_sync_has_the_metadata_columns(store: Store) -> None:
    frame = store.dataframe("nothing/here")
    assert frame.empty
    assert {"_id", "_connection_id", "_last_modified_at", "_deleted_at"} <= set(frame.columns)


def test_iter_dataframes_streams_in_chunks(store: Store) -> None:
    store.save(SYNC, CONN, NEWEST, [contact(f"k{i:03d}", 1) for i in range(25)])
    chunks = list(store.iter_dataframes(SYNC, CONN, chunk_size=10))
    assert [len(chunk) for chunk in chunks] == [10, 10, 5]
    assert list(pd.concat(chunks)["id"]) == [f"k{i:03d}" for i in range(25)]


def test_modified_after_must_be_aware(store: Store) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.changes(SYNC, CONN, modified_after=utcnow().replace(tzinfo=None) - timedelta(days=1))
