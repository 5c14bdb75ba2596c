"""Resetting a (sync, connection), on SQLite and Postgres: the checkpoint goes, records are kept,
tombstoned (the change feed shows the deletes, the next poll restores them) or removed (the feed
tells a reader with an older cursor to drop what it holds), and never beside a poll holding the
partition's lease."""

from __future__ import annotations

import pytest

from sync_project.store import LeaseHeldError, Store

from .helpers import NEWEST, contact, snapshot

SYNC = "crm/contacts"


def seed(store: Store, connection_id: str = "acme") -> str:
    """Three live records, one tombstone and a checkpoint; returns a feed cursor after them all."""
    with store.writer(SYNC, connection_id, NEWEST) as writer:
        writer.save([contact("a", 1), contact("b", 1), contact("c", 1), contact("d", 1)])
        writer.delete([{"id": "d", "updated_at": contact("d", 2)["updated_at"]}])
        writer.set_checkpoint({"updated_after": "2024-01-01T00:00:01+00:00"})
    page = store.changes(SYNC, connection_id, limit=100)
    assert not page.has_more and page.reset is None
    return str(page.next_cursor)


def test_a_reset_that_keeps_records_clears_only_the_checkpoint(store: Store) -> None:
    cursor = seed(store)
    seed(store, "globex")
    result = store.reset(SYNC, "acme", requested_by="cli:test")
    assert (result.records, result.checkpoint_cleared, result.tombstoned, result.removed) == ("kept", True, 0, 0)
    assert "checkpoint cleared; records kept" in result.describe()
    state = store.state.get(SYNC, "acme")
    assert state is not None and state.checkpoint is None
    assert store.count(SYNC, "acme") == 3
    assert store.changes(SYNC, "acme", cursor=cursor).records == []
    # Another connection is another partition.
    other = store.state.get(SYNC, "globex")
    assert other is not None and other.checkpoint is not None
    again = store.reset(SYNC, "acme", requested_by="cli:test")
    assert again.checkpoint_cleared is False
    assert [r.records for r in store.resets.list(SYNC, "acme")] == ["kept", "kept"]


def test_tombstoning_shows_every_delete_in_the_feed_and_the_next_poll_restores_them(store: Store) -> None:
    cursor = seed(store)
    result = store.reset(SYNC, "acme", records="tombstone", requested_by="cli:test")
    assert (result.records, result.tombstoned, result.removed) == ("tombstoned", 3, 0)
    assert "3 records tombstoned" in result.describe()
    assert store.count(SYNC, "acme") == 0 and store.count(SYNC, "acme", include_deleted=True) == 4
    page = store.changes(SYNC, "acme", cursor=cursor)
    assert sorted((c.id, c.last_action) for c in page.records) == [("a", "deleted"), ("b", "deleted"), ("c", "deleted")]
    assert all(c.data["name"].endswith("v1") for c in page.records)  # the last content is kept
    assert page.reset is None  # nothing to drop: the deletes say it all
    # The first poll after the reset finds the same copies: they are live again, as new changes.
    merged = store.save(SYNC, "acme", NEWEST, [contact("a", 1), contact("b", 1)])
    assert merged.added == 2  # a revived record counts as added, as after any delete
    assert store.count(SYNC, "acme") == 2
    after = store.changes(SYNC, "acme", cursor=page.next_cursor)
    assert sorted((c.id, c.last_action) for c in after.records) == [("a", "added"), ("b", "added")]
    # The provider's own delete (d, strong) is not undone by its old copy.
    assert store.save(SYNC, "acme", NEWEST, [contact("d", 1)]).skipped_stale == 1


def test_removing_empties_the_partition_and_tells_readers_with_an_older_cursor(store: Store) -> None:
    cursor = seed(store)
    seed(store, "globex")
    result = store.reset(SYNC, "acme", records="remove", requested_by="run-1")
    assert (result.records, result.removed, result.tombstoned) == ("removed", 4, 0)
    assert store.count(SYNC, "acme", include_deleted=True) == 0
    assert store.get(SYNC, "acme", "a") is None
    assert store.count(SYNC, "globex") == 3

    stale = store.changes(SYNC, "acme", cursor=cursor)
    assert stale.records == [] and stale.reset is not None
    assert (stale.reset.removed, stale.reset.reset_at) == (4, result.reset_at)
    assert store.changes(SYNC, "acme").reset is None  # a reader from the start holds nothing
    assert store.changes(SYNC, "globex", cursor=cursor).reset is None

    # Written after the removal: a record is new again, and a reader who dropped everything and
    # went on from its old cursor finds it; one whose cursor is past the removal hears nothing more.
    assert store.save(SYNC, "acme", NEWEST, [contact("a", 1)]).added == 1
    page = store.changes(SYNC, "acme", cursor=cursor)
    assert [(c.id, c.last_action) for c in page.records] == [("a", "added")] and page.reset is not None
    assert store.changes(SYNC, "acme", cursor=page.next_cursor).reset is None
    assert [r.requested_by for r in store.resets.list(SYNC)] == ["run-1"]


def test_a_reset_never_runs_beside_a_poll_holding_the_lease(store: Store) -> None:
    seed(store)
    before = snapshot(store)
    with store.leases.hold(SYNC, "acme", "poll", "run-polling") as keeper:
        with pytest.raises(LeaseHeldError, match=r"another run \(run-polling\) holds the poll lease"):
            store.reset(SYNC, "acme", records="remove", requested_by="cli:test")
        assert snapshot(store) == before
        # The run that holds it may reset under it (a run in reset mode does).
        assert (
            store.reset(SYNC, "acme", records="tombstone", requested_by="run-polling", lease=keeper.lease).tombstoned
            == 3
        )
    # A drain of the same partition is another role and does not stop a reset.
    with store.leases.hold(SYNC, "acme", "drain", "run-draining"):
        assert store.reset(SYNC, "acme", requested_by="cli:test").records == "kept"
    with pytest.raises(ValueError, match="unknown records action 'drop'"):
        store.reset(SYNC, "acme", records="drop", requested_by="cli:test")  # type: ignore[arg-type]
