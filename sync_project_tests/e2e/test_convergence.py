"""Convergence under chaos: lost, duplicated and reordered webhooks, then one reconciliation poll,
end with the records store equal to the provider's truth, and no record ever moves backwards.

Everything is real: the sandbox CRM and the receiver serve HTTP on loopback, the inbox sensor is
evaluated on a real Dagster instance, and the runs it requests execute as the daemon would run them.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from sqlalchemy import select

from sync_project.sandbox.chaos import ChaosSettings
from sync_project.store import Store
from sync_project.store.schema import records
from sync_project_tests.support.realtime import RealtimeHarness, stored_state

CONNECTIONS = {"demo-1": "acct-1", "demo-2": "acct-2"}
ROUNDS = 6
CHANGES_PER_ROUND = 25


class MonotonicWatch:
    """Fails the moment any record's source_updated_at is earlier than it was at a previous look."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: dict[tuple[str, str, str], object] = {}
        self.looks = 0

    def look(self) -> None:
        self.looks += 1
        query = select(records.c.sync, records.c.connection_id, records.c.external_id, records.c.source_updated_at)
        with self.store.engine.connect() as conn:
            for sync, connection_id, key, stamp in conn.execute(query):
                previous = self.seen.get((sync, connection_id, key))
                assert previous is None or stamp >= previous, (
                    f"{sync} {key}: source_updated_at went back {previous} -> {stamp}"
                )
                self.seen[(sync, connection_id, key)] = stamp


@pytest.fixture
def harness(store: Store) -> Iterator[RealtimeHarness]:
    with dg.instance_for_test() as instance:
        chaos = ChaosSettings(drop_pct=20, duplicate_pct=10, delay_s=0.3)
        realtime = RealtimeHarness(store, instance, chaos=chaos, stall_after_s=0.0)
        try:
            for connection_id, account_id in CONNECTIONS.items():
                realtime.connect(connection_id, account_id)
            yield realtime
        finally:
            realtime.close()


def test_webhooks_under_chaos_then_one_poll_converge_on_the_truth(harness: RealtimeHarness) -> None:
    watch = MonotonicWatch(harness.store)
    for _round in range(ROUNDS):
        for account_id in CONNECTIONS.values():
            harness.admin.apply_changes(CHANGES_PER_ROUND, account_id=account_id)
        harness.admin.flush()
        for _ in range(10):
            launched = harness.step()
            watch.look()
            if not launched:
                break
    deliveries = harness.admin.deliveries()
    assert deliveries.dropped > 0 and deliveries.duplicated > 0, deliveries
    assert all(result.success for result in harness.results)
    assert harness.store.inbox.stats().counts["pending"] == 0

    # Lost webhooks leave the store behind the truth until polling reconciles it.
    for connection_id in CONNECTIONS:
        for sync in harness.syncs:
            assert harness.poll(sync.key, connection_id, mode="full").success
            watch.look()

    tombstoned = 0
    for connection_id, account_id in CONNECTIONS.items():
        truth = harness.admin.truth(account_id)
        for sync in harness.syncs:
            live, tombstones = stored_state(harness.store, sync.key, connection_id)
            expected = {o["id"]: sync.model.model_validate(o).model_dump(mode="json") for o in truth[sync.name]}
            assert live == expected, f"{sync.key} {connection_id} differs from the truth"
            assert tombstones <= set(truth["deleted"][sync.name]), "a live record was tombstoned"
            assert harness.store.count(sync.key, connection_id) == len(truth[sync.name])
            tombstoned += len(tombstones)
    assert tombstoned > 0, "the run exercised no deletes"
    assert watch.looks > ROUNDS
