"""Bad input gets a clear error and writes nothing of its batch; a dead database is named as such."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from sync_project.store import InvalidBatchError, MergeStrategy, RecordSpec, Store, StoreUnavailableError

from .helpers import CONN, NEWEST, contact, snapshot, stamp

SYNC = "crm/contacts"


def seeded(store: Store) -> list[tuple[Any, ...]]:
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.save([contact("a", 1), contact("b", 1)])
        writer.set_checkpoint({"page": 1})
    return snapshot(store)


def _circular() -> dict[str, Any]:
    record = contact("d", 2)
    record["self"] = record
    return record


BAD_RECORDS: dict[str, tuple[list[Any], str]] = {
    "missing key": ([contact("c", 2), {"updated_at": stamp(2), "name": "no id"}], "no usable primary key 'id'"),
    "empty key": ([contact("c", 2), {**contact("x", 2), "id": ""}], "primary key 'id'"),
    "float key": ([contact("c", 2), {**contact("x", 2), "id": 1.5}], "no usable primary key"),
    "key too long": ([{**contact("x", 2), "id": "k" * 256}], "1 to 255 characters"),
    "set value": ([contact("c", 2), contact("d", 2, tags={"x", "y"})], "'d' is not JSON.*set"),
    "NaN": ([contact("c", 2), contact("d", 2, score=math.nan)], "'d' is not JSON: NaN and Infinity"),
    "infinity": ([contact("d", 2, score=math.inf)], "'d' is not JSON: NaN and Infinity"),
    "datetime object": ([contact("c", 2), contact("d", 2, seen=datetime(2024, 1, 1))], "'d' is not JSON.*datetime"),
    "lone surrogate": ([contact("c", 2), contact("d", 2, name="\ud800")], "'d' is not JSON: .*surrogate"),
    "circular": ([contact("c", 2), _circular()], "'d' is not JSON: it refers to itself"),
    "not an object": ([contact("c", 2), ["id", "d"]], "record #2 is a list, not a JSON object"),
    "missing timestamp": ([contact("c", 2), {"id": "d", "name": "x"}], "no 'updated_at'"),
    "bad timestamp": ([contact("c", 2), {**contact("d", 2), "updated_at": "last tuesday"}], "bad 'updated_at'"),
}


@pytest.mark.parametrize("records", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_fails_the_whole_batch_and_writes_nothing(store: Store, records: tuple[list[Any], str]) -> None:
    batch, message = records
    before = seeded(store)

    with pytest.raises(InvalidBatchError, match=message):
        store.save(SYNC, CONN, NEWEST, [contact("a", 5), *batch])

    assert snapshot(store) == before


def test_bad_batch_inside_a_writer_keeps_earlier_batches_of_that_writer(store: Store) -> None:
    """Only the refused batch is dropped; a caller that handles the error keeps the rest."""
    before = seeded(store)
    with store.writer(SYNC, CONN, NEWEST) as writer:
        writer.save([contact("a", 2)])
        with pytest.raises(InvalidBatchError):
            writer.save([contact("b", 2), {"name": "keyless"}])
    after = store.get(SYNC, CONN, "a"), store.get(SYNC, CONN, "b")
    assert after[0] is not None and after[0].data["version"] == 2
    assert after[1] is not None and after[1].data["version"] == 1
    assert snapshot(store) != before


def test_bad_partial_update_and_delete_write_nothing(store: Store) -> None:
    before = seeded(store)
    with pytest.raises(InvalidBatchError, match="not JSON"):
        store.update(SYNC, CONN, NEWEST, [{"id": "a", "name": "ok"}, {"id": "b", "tags": {1, 2}}])
    with pytest.raises(InvalidBatchError, match="primary key"):
        store.delete(SYNC, CONN, NEWEST, [{"id": "a"}, {"gone": True}])
    assert snapshot(store) == before


def test_wrong_strategy_name_is_refused(store: Store) -> None:
    with pytest.raises(InvalidBatchError, match="unknown merge strategy 'newest_wins'.*newest_source_wins"):
        RecordSpec(primary_key="id", updated_field="updated_at", strategy="newest_wins")  # type: ignore[arg-type]
    with pytest.raises(InvalidBatchError, match="needs updated_field"):
        RecordSpec(primary_key="id", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
    assert RecordSpec(strategy="override").strategy is MergeStrategy.OVERRIDE  # type: ignore[arg-type]


BAD_CALLS: dict[str, tuple[Callable[[Store], Any], str]] = {
    "naive fetched_at": (
        lambda s: s.save(SYNC, CONN, NEWEST, [contact("c", 1)], fetched_at=datetime(2024, 1, 1)),
        "fetched_at must be timezone-aware",
    ),
    "fetched_at not a datetime": (
        lambda s: s.save(SYNC, CONN, NEWEST, [contact("c", 1)], fetched_at="2024-01-01"),  # type: ignore[arg-type]
        "fetched_at must be a datetime",
    ),
    "one record instead of a list": (
        lambda s: s.save(SYNC, CONN, NEWEST, contact("c", 1)),  # type: ignore[arg-type]
        "a batch is a list of records",
    ),
    "sync name too long": (lambda s: s.save("s" * 129, CONN, NEWEST, [contact("c", 1)]), "sync must be"),
    "empty connection": (lambda s: s.save(SYNC, "", NEWEST, [contact("c", 1)]), "connection_id must be"),
    "spec not a RecordSpec": (
        lambda s: s.save(SYNC, CONN, {"primary_key": "id"}, [contact("c", 1)]),  # type: ignore[arg-type]
        "spec must be a RecordSpec",
    ),
    "naive started_at": (
        lambda s: _delete_unseen(s, datetime(2024, 1, 1)),
        "started_at must be timezone-aware",
    ),
}


def _delete_unseen(store: Store, started_at: datetime) -> int:
    with store.writer(SYNC, CONN, NEWEST) as writer:
        return writer.delete_unseen("run-1", started_at)


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_call_is_a_clear_error_and_writes_nothing(store: Store, call: tuple[Callable[[Store], Any], str]) -> None:
    action, message = call
    before = seeded(store)
    with pytest.raises(InvalidBatchError, match=message):
        action(store)
    assert snapshot(store) == before


def test_invalid_batch_error_is_a_value_error() -> None:
    assert issubclass(InvalidBatchError, ValueError)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the block ends: nothing listens


def test_unreachable_postgres_is_store_unavailable() -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/test"
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        Store(url)


def test_postgres_going_away_mid_life_is_store_unavailable(postgres_url: str) -> None:
    import sqlalchemy as sa

    with Store(postgres_url) as store:
        store.save(SYNC, CONN, NEWEST, [contact("a", 1)])
        with store.engine.connect() as conn:
            pids = [row[0] for row in conn.execute(sa.text("SELECT pg_backend_pid()"))]
        # Kill the pooled session(s) from outside, as a server restart would.
        admin = sa.create_engine(postgres_url)
        with admin.begin() as conn:
            for pid in pids:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        admin.dispose()
        # The pool notices (pre-ping) and reconnects: a restart costs nothing.
        assert store.count(SYNC, CONN) == 1


def test_unopenable_sqlite_is_store_unavailable(tmp_path: Any) -> None:
    missing_dir = tmp_path / "no" / "such" / "dir" / "sync.db"
    with pytest.raises(StoreUnavailableError):
        Store(f"sqlite:///{missing_dir}")
