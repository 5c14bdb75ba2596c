"""Property tests: random interleavings of polls and webhooks against the merge guarantees.

The world: a provider whose records change over time (new versions, deletes, restores). Every
change is announced by a webhook, which may arrive late, out of order, twice or never. Polls read
the provider's state at one moment (``fetched_at``) and write it a few steps later, after webhooks
that arrived in between. Full refreshes do the same and then detect deletes by absence; some see
only part of the provider (as one that lost its partition to another run, or got truncated pages,
would), so they tombstone live records wrongly. Those inferred tombstones are weak: the next copy
of the record that is not older than the last one seen alive brings it back, while a delete the
provider announced yields only to a newer copy. Each example reuses the test's store with a sync
name of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_project.core.clock import utcnow
from sync_project.store import RecordSpec, Store
from sync_project.store.feed import Change

from .helpers import CONN, MODIFIED_AFTER, NEWEST, at, contact, stamp

KEYS = ("a", "b", "c")


@dataclass(frozen=True)
class Version:
    """One state of one record at the provider; versions of a key grow with its updated_at."""

    key: str
    number: int
    deleted: bool

    def payload(self) -> dict[str, Any]:
        if self.deleted:
            return {"id": self.key, "updated_at": stamp(self.number)}
        return contact(self.key, self.number)


# One step of the world. ("change", key, delete?) | ("webhook", index) | ("webhooks", indexes)
# | ("poll", keys, delay) | ("refresh", keys, delay): indexes pick among the webhooks announced so
# far; a refresh that is not given every key sees only part of the provider.
step = st.one_of(
    st.tuples(st.just("change"), st.sampled_from(KEYS), st.booleans()),
    st.tuples(st.just("webhook"), st.integers(0, 50)),
    st.tuples(st.just("webhooks"), st.lists(st.integers(0, 50), min_size=2, max_size=4)),
    st.tuples(st.just("poll"), st.sets(st.sampled_from(KEYS), min_size=1), st.integers(0, 3)),
    st.tuples(st.just("refresh"), st.sets(st.sampled_from(KEYS)), st.integers(0, 3)),
)
scenarios = st.lists(step, min_size=1, max_size=25)


@dataclass
class Poll:
    batch: list[dict[str, Any]]
    fetched_at: datetime
    due_in: int
    #: A full refresh: its records are marked seen by this run, then unseen ones are tombstoned.
    refresh_run: str | None = None


@dataclass
class World:
    """Drives one scenario against the store and remembers what was written."""

    store: Store
    spec: RecordSpec
    check: Callable[[World, str, list[Version], dict[str, Change | None], datetime | None], None]
    sync: str = field(default_factory=lambda: f"prop/{uuid.uuid4().hex[:12]}")
    truth: dict[str, Version] = field(default_factory=dict)
    announced: list[Version] = field(default_factory=list)
    #: The newest version of each key that any write has carried to the store so far.
    newest_written: dict[str, Version] = field(default_factory=dict)
    #: Keys whose stored state is a tombstone inferred by a full refresh (absence, weak).
    inferred: set[str] = field(default_factory=set)
    pending: list[Poll] = field(default_factory=list)

    def run(self, steps: list[tuple[Any, ...]]) -> None:
        for item in steps:
            self.apply(item)
            for poll in [p for p in self.pending if p.due_in <= 0]:
                self.pending.remove(poll)
                self.write_poll(poll)
            for poll in self.pending:
                poll.due_in -= 1
        for poll in self.pending:
            self.write_poll(poll)

    def apply(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "change":
            _, key, delete = item
            previous = self.truth.get(key)
            version = Version(key, (previous.number if previous else 0) + 1, delete and previous is not None)
            self.truth[key] = version
            self.announced.append(version)
        elif kind == "webhook" and self.announced:
            self.deliver([self.announced[item[1] % len(self.announced)]])
        elif kind == "webhooks" and self.announced:
            # Several events in one delivery: saves go as one batch, duplicates included.
            versions = [self.announced[i % len(self.announced)] for i in item[1]]
            self.deliver([v for v in versions if not v.deleted])
            self.deliver([v for v in versions if v.deleted])
        elif kind == "poll":
            live = [self.truth[k] for k in sorted(item[1]) if k in self.truth and not self.truth[k].deleted]
            if live:  # read now, written ``item[2]`` steps later
                self.pending.append(Poll([v.payload() for v in live], utcnow(), item[2]))
        elif kind == "refresh":
            live = [self.truth[k] for k in sorted(item[1]) if k in self.truth and not self.truth[k].deleted]
            self.pending.append(Poll([v.payload() for v in live], utcnow(), item[2], f"run-{uuid.uuid4().hex[:8]}"))

    def deliver(self, versions: list[Version]) -> None:
        """A webhook write: fetched when it is written (it carries the state the provider sent)."""
        if not versions:
            return
        before = self.state()
        payloads = [v.payload() for v in versions]
        if versions[0].deleted:
            self.store.delete(self.sync, CONN, self.spec, payloads)
        else:
            self.store.save(self.sync, CONN, self.spec, payloads)
        self.written(versions)
        self.check(self, "webhook", versions, before, None)

    def write_poll(self, poll: Poll) -> None:
        before = self.state()
        with self.store.writer(self.sync, CONN, self.spec) as writer:
            writer.save(poll.batch, fetched_at=poll.fetched_at, seen_by_run=poll.refresh_run)
        versions = [Version(r["id"], r["version"], False) for r in poll.batch]
        self.written(versions)
        self.check(self, "poll", versions, before, poll.fetched_at)
        if poll.refresh_run is not None:
            self.detect_deletes(poll.refresh_run, {r["id"] for r in poll.batch}, poll.fetched_at)

    def detect_deletes(self, run_id: str, seen: set[str], started_at: datetime) -> None:
        """Exactly the live records this refresh did not see, and nobody wrote since it started,
        become tombstones; nothing else changes."""
        before = self.state()
        with self.store.writer(self.sync, CONN, self.spec) as writer:
            tombstoned = writer.delete_unseen(run_id, started_at)
        after = self.state()
        expected = {
            key
            for key, record in before.items()
            if record is not None
            and record.deleted_at is None
            and key not in seen
            and record.last_modified_at < started_at
        }
        assert tombstoned == len(expected)
        for key in KEYS:
            previous, record = before[key], after[key]
            if key not in expected:
                assert record == previous, f"{key}: delete detection changed a record it must not"
                continue
            assert previous is not None and record is not None and record.deleted_at is not None
            # Weak: it keeps the provider version last seen alive.
            assert record.source_updated_at == previous.source_updated_at and record.data == previous.data
        self.inferred |= expected

    def written(self, versions: list[Version]) -> None:
        for version in versions:
            best = self.newest_written.get(version.key)
            if version.key in self.inferred and (best is None or version.number >= best.number):
                self.inferred.discard(version.key)  # a copy as new as the last live one revives it
            if best is None or version.number > best.number:
                self.newest_written[version.key] = version

    def state(self) -> dict[str, Change | None]:
        return {key: self.store.get(self.sync, CONN, key) for key in KEYS}


def assert_holds(version: Version, record: Change | None, *, inferred_tombstone: bool = False) -> None:
    assert record is not None, f"{version.key} missing"
    assert record.source_updated_at == at(version.number), (version, record)
    if inferred_tombstone:
        assert record.deleted_at is not None, (version, record)
    elif version.deleted:
        assert record.deleted_at is not None, (version, record)
    else:
        assert record.deleted_at is None, (version, record)
        assert record.data == version.payload(), (version, record)


def check_newest_source_wins(
    world: World, kind: str, versions: list[Version], before: dict[str, Change | None], fetched_at: datetime | None
) -> None:
    """After every write, every key holds exactly the newest version written so far, and no
    record's source_updated_at went backwards."""
    after = world.state()
    for key in KEYS:
        previous, record = before[key], after[key]
        if previous is not None:
            assert record is not None and record.source_updated_at is not None
            assert previous.source_updated_at is not None
            assert record.source_updated_at >= previous.source_updated_at, f"{key}: source_updated_at went back"
        if key in world.newest_written:
            assert_holds(world.newest_written[key], record, inferred_tombstone=key in world.inferred)
        else:
            assert record is None


def check_ignore_if_modified_after(
    world: World, kind: str, versions: list[Version], before: dict[str, Change | None], fetched_at: datetime | None
) -> None:
    """Nango's guarantee, exactly: a write skips a record modified in the store after the batch
    was fetched, and applies everything else (its last copy, for duplicates)."""
    after = world.state()
    last_copy = {version.key: version for version in versions}
    for key in KEYS:
        previous, record = before[key], after[key]
        if key not in last_copy:
            assert record == previous, f"{key} changed by a write that did not carry it"
            continue
        if fetched_at is not None and previous is not None and previous.last_modified_at > fetched_at:
            assert record == previous, f"{key}: a copy fetched before the last write overwrote it"
            continue
        version = last_copy[key]
        assert record is not None
        if version.deleted:
            assert record.deleted_at is not None
        else:
            assert record.deleted_at is None and record.data == version.payload(), (kind, version, record)


_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(steps=scenarios)
def test_newest_source_wins_keeps_the_newest_version_under_any_interleaving(
    store: Store, steps: list[tuple[Any, ...]]
) -> None:
    world = World(store, NEWEST, check_newest_source_wins)
    world.run(steps)
    final = world.state()
    for key, best in world.newest_written.items():
        assert_holds(best, final[key], inferred_tombstone=key in world.inferred)
    reconcile(world)


@_SETTINGS
@given(steps=scenarios)
def test_ignore_if_modified_after_keeps_its_guarantee(store: Store, steps: list[tuple[Any, ...]]) -> None:
    world = World(store, MODIFIED_AFTER, check_ignore_if_modified_after)
    world.run(steps)
    reconcile(world)


def reconcile(world: World) -> None:
    """Polling reconciles: one complete full refresh after everything leaves the store equal to
    the provider, whatever webhooks were lost and whatever earlier refreshes wrongly tombstoned."""
    live = [world.truth[k] for k in KEYS if k in world.truth and not world.truth[k].deleted]
    world.write_poll(Poll([v.payload() for v in live], utcnow(), 0, "run-reconcile"))
    final = world.state()
    for key in KEYS:
        truth, record = world.truth.get(key), final[key]
        if truth is None:
            assert record is None
        elif truth.deleted:
            assert record is None or record.deleted_at is not None, (truth, record)
        else:
            assert record is not None and record.deleted_at is None and record.data == truth.payload(), (truth, record)


def test_ignore_if_modified_after_lets_a_stale_out_of_order_webhook_win(store: Store) -> None:
    """And no more: it knows nothing of provider time, so a late webhook carrying an older
    version overwrites a newer one (as in Nango). newest_source_wins keeps the newer version."""
    for spec, survivor in ((MODIFIED_AFTER, 1), (NEWEST, 2)):
        sync = f"late/{spec.strategy.value}"
        store.save(sync, CONN, spec, [contact("a", 2)])  # the webhook for version 2 arrives first
        store.save(sync, CONN, spec, [contact("a", 1)])  # then the delayed one for version 1
        record = store.get(sync, CONN, "a")
        assert record is not None and record.data["version"] == survivor, spec.strategy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(record=st.dictionaries(st.text(), json_values, max_size=6))
def test_canonical_json_is_exactly_sorted_compact_json(record: dict[str, Any]) -> None:
    """Stored hashes are over this text: it must stay byte-identical to json.dumps' canonical form,
    whichever encoder produces it, or every stored record would look changed."""
    import json

    from sync_project.store.merge import canonical_json

    expected = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert canonical_json(record) == expected
