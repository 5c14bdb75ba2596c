"""Merge against dlt: the same records, the same Postgres, sync_project's store vs dlt's ``merge``.

What is measured (issue 8), in one run on one machine, into one private database dropped afterwards:

1. **initial load**: 200k records of ~500 bytes of JSON (``id``, ``updated_at``, ...) into empty tables.
2. **changes**: 20% of the records updated and 1% deleted, delivered as what an incremental source
   sends: the 40k changed records and 2k delete markers, shuffled into one stream. Three rounds,
   each on the state the last one left (a round takes seconds, so one alone is at the mercy of
   the machine's noise: single rounds here ranged from 2.4x to 3.2x); the figure is each side's
   median round.
3. **full refresh** (extra, no target): the source re-sends every surviving record (another 20% of
   them changed) and 1% of the records have vanished.

Records/s = records the source handed over / wall-clock seconds from Python objects in memory to
committed rows (for the changes, the median round's seconds). The same count divides both sides,
so the ratio is the ratio of the two times.
The workload is frozen out of the cyclic GC (as in merge.py); each timed section starts after
``gc.collect()`` and a Postgres ``CHECKPOINT``, and which side goes first alternates from load to
load, so neither always pays for the other's dirty pages.

Why these are the fair equivalents of each other:

* dlt runs ``pipeline.run`` with ``write_disposition="merge"`` (its default ``delete-insert`` strategy
  on Postgres), ``primary_key="id"`` and a boolean ``deleted`` column carrying dlt's ``hard_delete``
  hint, so a delete marker removes the row. One ``run`` is one load: extract, normalize, stage and
  merge in one transaction. dlt's first run also creates its tables (a fraction of a second); the
  store's tables are migrated before the clock starts.
* sync_project runs a polling run's own code, ``orchestration.polling.poll``, over a source that
  hands it the same pages from memory: one ``store.writer(...)`` transaction per page of 5,000,
  ``save`` for records and ``delete`` for the delete markers of that page, under
  ``newest_source_wins`` (so every record is guarded, hashed and counted, and a delete leaves a
  tombstone for the change feed instead of removing the row), with the next page prepared on the
  fetch thread while the current one's transaction runs, as in every poll.
* Both receive exactly the same rows for loads 1 and 2. For load 3, dlt's ``merge`` cannot see that
  a record is absent, so it is handed the 2k delete markers explicitly (which favours dlt), while
  sync_project takes the realistic full-refresh path: ``poll(mode="full")`` marks every record it
  sees with the run's id, then tombstones the records no page contained (``delete_unseen``).

After each load both final states are read back and checked against the expected one (same live
ids, same ``updated_at`` for each); a mismatch stops the benchmark, since a fast wrong load is no
figure. Target: sync_project at least 3x dlt's records/s on loads 1 and 2.

Finally a small case, a handful of records: a fresh batch (webhooks) lands, then a stale batch (a
poll page read before those webhooks) arrives. The script prints what each keeps. sync_project
under ``newest_source_wins`` keeps the fresh versions and the tombstone; dlt's ``merge`` keeps what
came last: its ``dedup_sort`` hint only orders duplicates *within* one load, and ``upsert`` with
``row_version_column_name`` only compares that column for inequality, so the stale copy wins and
the deleted record comes back. The script shows this by running them, not by assuming it.

Run: ``.venv/bin/python benchmarks/dlt_merge.py [--records N | --quick] [--json PATH] [--profile]``
(needs the ``bench`` extra: ``pip install -e '.[bench]'``). ``--profile`` prints where the store's
loads spend their time (cProfile, to stderr).
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import logging
import pstats
import random
import statistics
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _common import (
    DATASET_EPOCH,
    DATASET_RECORDS,
    PAGE_SIZE,
    SEED,
    Figure,
    Stopwatch,
    benchmark_parser,
    exit_cleanly_on_sigterm,
    figure,
    make_dataset,
    modified,
    private_postgres_database,
    publish,
    record_bytes,
    sample_indexes,
)
from _dlt_peer import DELETED_FRACTION, UPDATED_FRACTION, check_versions, dlt_credentials, isolated_dlt
from pydantic import BaseModel, ConfigDict

from sync_project.core.clock import utcnow
from sync_project.core.sync import Page, SyncDefinition
from sync_project.orchestration.polling import poll
from sync_project.store import MergeStrategy, ProviderConnection, RecordSpec, Store, parse_timestamp

BENCHMARK = "dlt_merge"
QUICK_RECORDS = 20_000
TARGET_RATIO = 3.0
#: Rounds of the change load (each on the state the previous one left).
CHANGE_ROUNDS = 3

SYNC = "bench/contacts"
CONNECTION = "bench"
SPEC = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
DLT_DATASET = "dlt_bench"
DLT_TABLE = "contacts"
#: The column dlt's ``hard_delete`` hint reads: a row with ``deleted = true`` removes its record.
DELETED_COLUMN = "deleted"

Record = dict[str, Any]


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Load:
    """One load, as each side receives it."""

    name: str
    #: Pages for sync_project: (records to save, delete markers).
    pages: list[tuple[list[Record], list[Record]]]
    #: The same rows for dlt, delete markers flagged with ``deleted: true``.
    dlt_rows: list[Record]
    #: The records/s denominator, the same for both sides.
    source_records: int
    #: Live ids and their ``updated_at`` after the load.
    expected: dict[str, str]
    full_refresh: bool = False
    has_target: bool = True
    #: Loads of one name are rounds of one case (1, 2, ...); its figure is their median.
    round_number: int = 1


@dataclass
class Workload:
    loads: list[Load] = field(default_factory=list)
    record_bytes: float = 0.0


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _delete_marker(record_id: str, deleted_at: datetime) -> Record:
    return {"id": record_id, "updated_at": _iso(deleted_at)}


def _pages(records: Sequence[Record], deletes: Sequence[Record]) -> list[tuple[list[Record], list[Record]]]:
    """Pages of ``PAGE_SIZE`` source rows: records first, then the delete markers, as a poll sends them."""
    rows: list[tuple[bool, Record]] = [(False, r) for r in records] + [(True, d) for d in deletes]
    pages = []
    for start in range(0, len(rows), PAGE_SIZE):
        chunk = rows[start : start + PAGE_SIZE]
        pages.append(([r for is_delete, r in chunk if not is_delete], [r for is_delete, r in chunk if is_delete]))
    return pages


def _dlt_rows(records: Sequence[Record], deletes: Sequence[Record]) -> list[Record]:
    return list(records) + [{**marker, DELETED_COLUMN: True} for marker in deletes]


def build_workload(count: int) -> Workload:
    """The three loads, from the fixed-seed dataset; same bytes on every run."""
    rng = random.Random(SEED + 1)
    initial = make_dataset(count)
    workload = Workload(record_bytes=record_bytes(initial))
    workload.loads.append(
        Load(
            name=f"initial load, {count:,} records",
            pages=_pages(initial, []),
            dlt_rows=_dlt_rows(initial, []),
            source_records=count,
            expected={r["id"]: r["updated_at"] for r in initial},
        )
    )

    # Load 2, in CHANGE_ROUNDS rounds: each time 20% of the live records updated and 1% deleted,
    # shuffled into one change stream. One round takes seconds, so a single one is at the mercy of
    # the machine's noise; the figure is the median round of each side.
    current = list(initial)
    gone: set[int] = set()
    for round_number in range(1, CHANGE_ROUNDS + 1):
        updated = sample_indexes(count, UPDATED_FRACTION, rng, exclude=gone)
        deleted = sample_indexes(count, DELETED_FRACTION, rng, exclude=gone.union(updated))
        changed_at = DATASET_EPOCH + timedelta(days=round_number)
        for index in updated:
            current[index] = modified(current[index], rng, changed_at + timedelta(milliseconds=index))
        stream: list[tuple[bool, Record]] = [(False, current[i]) for i in updated]
        stream += [(True, _delete_marker(initial[i]["id"], changed_at + timedelta(hours=1))) for i in deleted]
        rng.shuffle(stream)
        gone.update(deleted)
        changes_pages = []
        for start in range(0, len(stream), PAGE_SIZE):
            chunk = stream[start : start + PAGE_SIZE]
            changes_pages.append(([r for d, r in chunk if not d], [r for d, r in chunk if d]))
        workload.loads.append(
            Load(
                name=f"changes: {len(updated):,} updated + {len(deleted):,} deleted of {count:,}",
                pages=changes_pages,
                dlt_rows=[{**r, DELETED_COLUMN: True} if d else r for d, r in stream],
                source_records=len(stream),
                expected={current[i]["id"]: current[i]["updated_at"] for i in range(count) if i not in gone},
                round_number=round_number,
            )
        )

    # Load 3: a full refresh re-sends every survivor (another 20% changed); 1% have vanished.
    live = [i for i in range(count) if i not in gone]
    refreshed_at = DATASET_EPOCH + timedelta(days=CHANGE_ROUNDS + 1)
    updated_again = set(rng.sample(live, round(count * UPDATED_FRACTION)))
    vanished = set(rng.sample([i for i in live if i not in updated_again], round(count * DELETED_FRACTION)))
    for index in updated_again:
        current[index] = modified(current[index], rng, refreshed_at + timedelta(milliseconds=index))
    survivors = [current[i] for i in live if i not in vanished]
    markers = [_delete_marker(current[i]["id"], refreshed_at + timedelta(hours=1)) for i in sorted(vanished)]
    workload.loads.append(
        Load(
            name=(
                f"full refresh: {len(survivors):,} re-sent ({len(updated_again):,} changed), {len(vanished):,} vanished"
            ),
            pages=_pages(survivors, []),
            dlt_rows=_dlt_rows(survivors, markers),
            source_records=len(live),
            expected={r["id"]: r["updated_at"] for r in survivors},
            full_refresh=True,
            has_target=False,
        )
    )
    return workload


# -- the two sides ------------------------------------------------------------------------------


#: The poll logs a line per page (Dagster shows them); here they would only cost time.
_QUIET = logging.getLogger("dlt_merge.poll")
_QUIET.setLevel(logging.WARNING)


class _BenchRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    updated_at: str


def load_with_store(store: Store, load: Load, *, sync: str = SYNC, client: httpx.Client | None = None) -> None:
    """What a polling run does with these pages: ``orchestration.polling.poll`` itself, whose source
    hands over the pages from memory (one locked transaction per page, the next page prepared on
    the fetch thread meanwhile), then, for a full refresh, delete detection."""
    provider, name = sync.split("/", 1)
    definition = SyncDefinition(
        provider=provider,
        name=name,
        model=_BenchRecord,
        fetch=lambda ctx: (Page(records=records, deleted=deletes) for records, deletes in load.pages),
        updated_field="updated_at",
        strategy=SPEC.strategy,
        track_deletes=load.full_refresh,
    )
    assert definition.record_spec == SPEC
    now = utcnow()
    connection = ProviderConnection(provider=provider, connection_id=CONNECTION, created_at=now, updated_at=now)
    # The client is unused (the pages come from memory); a run has its provider's client before
    # it polls, so the timed runs get one made beforehand (building its TLS context takes 40 ms).
    with contextlib.nullcontext(client) if client is not None else httpx.Client() as unused_client:
        poll(
            store,
            definition,
            connection,
            unused_client,
            _QUIET,
            mode="full" if load.full_refresh else "incremental",
            run_id=uuid.uuid4().hex,
        )


def dlt_pipeline(database_url: str, workdir: Path, name: str, dataset: str) -> Any:
    import dlt

    return dlt.pipeline(
        pipeline_name=name,
        pipelines_dir=str(workdir / "pipelines"),
        destination=dlt.destinations.postgres(credentials=dlt_credentials(database_url)),
        dataset_name=dataset,
    )


def dlt_resource(
    rows: Sequence[Record], *, write_disposition: Any = "merge", extra_columns: dict[str, Any] | None = None
) -> Any:
    import dlt

    columns: dict[str, Any] = {DELETED_COLUMN: {"data_type": "bool", "hard_delete": True}}
    columns.update(extra_columns or {})
    return dlt.resource(  # type: ignore[call-overload]  # dlt's column hints are TypedDicts; these are plain dicts of their keys
        rows, name=DLT_TABLE, write_disposition=write_disposition, primary_key="id", columns=columns
    )


def load_with_dlt(pipeline: Any, rows: Sequence[Record], **hints: Any) -> None:
    info = pipeline.run(dlt_resource(rows, **hints))
    info.raise_on_failed_jobs()


# -- checks -------------------------------------------------------------------------------------


def _as_instants(expected: dict[str, str]) -> dict[str, datetime]:
    return {key: parse_timestamp(value) for key, value in expected.items()}


def check_store(engine: sa.Engine, load: Load, sync: str = SYNC) -> None:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT external_id, source_updated_at FROM records"
                " WHERE sync = :sync AND connection_id = :conn AND deleted_at IS NULL"
            ),
            {"sync": sync, "conn": CONNECTION},
        ).all()
    _compare("sync_project", {key: parse_timestamp(at) for key, at in rows}, load)


def check_dlt(engine: sa.Engine, load: Load) -> None:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f'SELECT id, updated_at FROM "{DLT_DATASET}"."{DLT_TABLE}"')).all()
    _compare("dlt", {key: parse_timestamp(at) for key, at in rows}, load)


def _compare(side: str, actual: dict[str, datetime], load: Load) -> None:
    check_versions(f"{side} ended the load {load.name!r} in the wrong state", actual, _as_instants(load.expected))


# -- stale after fresh ----------------------------------------------------------------------------

_T0 = DATASET_EPOCH
_T1 = DATASET_EPOCH + timedelta(hours=1)  # when the stale poll page was read
_T2 = DATASET_EPOCH + timedelta(hours=2)  # when the webhooks fired


def _deal(key: str, at: datetime, stage: str) -> Record:
    return {"id": key, "updated_at": _iso(at), "stage": stage}


STALE_INITIAL = [_deal("deal-1", _T0, "new"), _deal("deal-2", _T0, "new"), _deal("deal-3", _T0, "new")]
STALE_FRESH = [_deal("deal-1", _T2, "won"), _deal("deal-2", _T2, "lost")]
STALE_FRESH_DELETES = [_delete_marker("deal-3", _T2)]
STALE_LATE = [
    _deal("deal-1", _T1, "negotiating"),
    _deal("deal-2", _T1, "negotiating"),
    _deal("deal-3", _T1, "negotiating"),
    _deal("deal-4", _T1, "new"),
]
#: The newest provider version of each record: what a correct merge keeps.
STALE_NEWEST = {"deal-1": "won @T2", "deal-2": "lost @T2", "deal-3": "deleted", "deal-4": "new @T1"}


def _label(stage: str | None, at: datetime | str | None) -> str:
    if stage is None:
        return "deleted"
    moment = parse_timestamp(at)
    names = {_T0: "T0", _T1: "T1", _T2: "T2"}
    return f"{stage} @{names.get(moment, moment.isoformat())}"


def stale_case_store(store: Store, sync: str = "bench/stale") -> dict[str, str]:
    with store.writer(sync, CONNECTION, SPEC) as writer:
        writer.save(STALE_INITIAL)
    with store.writer(sync, CONNECTION, SPEC) as writer:
        writer.save(STALE_FRESH)
        writer.delete(STALE_FRESH_DELETES)
    with store.writer(sync, CONNECTION, SPEC) as writer:
        writer.save(STALE_LATE)
    kept = {}
    for key in STALE_NEWEST:
        change = store.get(sync, CONNECTION, key)
        if change is None:
            kept[key] = "absent"
        elif change.deleted_at is not None:
            kept[key] = "deleted"
        else:
            kept[key] = _label(change.data["stage"], change.data["updated_at"])
    return kept


def stale_case_dlt(database_url: str, workdir: Path, dataset: str, **hints: Any) -> dict[str, str]:
    pipeline = dlt_pipeline(database_url, workdir, f"stale_{dataset}", dataset)
    load_with_dlt(pipeline, STALE_INITIAL, **hints)
    load_with_dlt(pipeline, _dlt_rows(STALE_FRESH, STALE_FRESH_DELETES), **hints)
    load_with_dlt(pipeline, STALE_LATE, **hints)
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT id, stage, updated_at FROM "{dataset}"."{DLT_TABLE}"')).all()
    finally:
        engine.dispose()
    found = {key: _label(stage, at) for key, stage, at in rows}
    return {key: found.get(key, "deleted") for key in STALE_NEWEST}


#: dlt's ways of merging, as the stale case tries them: (label, dataset, resource hints).
DLT_STALE_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("dlt merge (delete-insert)", "dlt_stale_default", {}),
    (
        "dlt merge + dedup_sort updated_at desc",
        "dlt_stale_dedup",
        {"extra_columns": {"updated_at": {"dedup_sort": "desc"}}},
    ),
    (
        "dlt upsert, skip_unchanged_rows on updated_at",
        "dlt_stale_upsert",
        {
            "write_disposition": {
                "disposition": "merge",
                "strategy": "upsert",
                "skip_unchanged_rows": True,
                "row_version_column_name": "updated_at",
            }
        },
    ),
]


def print_stale_table(states: dict[str, dict[str, str]]) -> None:
    header = ["record", "newest version", *states]
    rows = [[key, newest, *(state[key] for state in states.values())] for key, newest in STALE_NEWEST.items()]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("Stale batch after a fresh one: initial @T0; fresh batch @T2 (deal-3 deleted); then a poll page read @T1.")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print()


# -- the run ------------------------------------------------------------------------------------


@contextmanager
def profiled(enabled: bool, label: str) -> Iterator[None]:
    if not enabled:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(15)
        print(f"--- profile of sync_project, {label} ---\n{out.getvalue()}", file=sys.stderr)


def timed(engine: sa.Engine, action: Callable[[], None]) -> float:
    """Seconds of ``action``, started with the garbage and the dirty pages of the last load flushed.

    Without the CHECKPOINT, whichever side runs second would pay for writing out the first's rows.
    """
    gc.collect()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("CHECKPOINT"))
    except sa.exc.DBAPIError:
        pass  # not a superuser: the figures are a little noisier, no less valid
    with Stopwatch() as watch:
        action()
    return watch.seconds


def run(count: int, *, profile: bool = False) -> list[Figure]:
    workload = build_workload(count)
    # The three loads (~600k dicts) stay alive for the whole run; a sync holds one page. Frozen out
    # of the cyclic GC, its full collections stop walking them on whichever side happens to trigger
    # one (measured before: two such collections were 1.1 s of the store's 4.3 s change load).
    gc.collect()
    gc.freeze()
    print(f"dataset: {count:,} records, {workload.record_bytes:.0f} bytes of JSON each on average\n")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="dlt-bench-") as tmp, private_postgres_database("bench_dlt") as url:
        workdir = Path(tmp)
        store = Store(url)
        engine = sa.create_engine(url)
        client = httpx.Client()
        try:
            pipeline = dlt_pipeline(url, workdir, "sync_project_bench", DLT_DATASET)
            # Seconds per round of each case, in the order the cases first come.
            rounds: dict[str, tuple[Load, list[float], list[float]]] = {}
            cases = Counter(load.name for load in workload.loads)
            for number, load in enumerate(workload.loads):
                # Alternate who goes first, so neither always meets the other's autovacuum.
                if number % 2:
                    theirs = timed(engine, lambda: load_with_dlt(pipeline, load.dlt_rows))  # noqa: B023 - called at once, in this iteration
                with profiled(profile, load.name):
                    ours = timed(engine, lambda: load_with_store(store, load, client=client))  # noqa: B023 - called at once, in this iteration
                if not number % 2:
                    theirs = timed(engine, lambda: load_with_dlt(pipeline, load.dlt_rows))  # noqa: B023 - called at once, in this iteration
                check_store(engine, load)
                check_dlt(engine, load)
                _, our_times, their_times = rounds.setdefault(load.name, (load, [], []))
                our_times.append(ours)
                their_times.append(theirs)
                label = f" (round {load.round_number} of {cases[load.name]})" if cases[load.name] > 1 else ""
                print(
                    f"{load.name}{label}: sync_project {ours:.2f} s ({load.source_records / ours:,.0f} records/s),"
                    f" dlt {theirs:.2f} s ({load.source_records / theirs:,.0f} records/s)"
                )
            for name, (load, our_times, their_times) in rounds.items():
                ours_rate = load.source_records / statistics.median(our_times)
                theirs_rate = load.source_records / statistics.median(their_times)
                if len(our_times) > 1:
                    print(
                        f"{name}, median of {len(our_times)} rounds: sync_project {ours_rate:,.0f} records/s,"
                        f" dlt {theirs_rate:,.0f} records/s, {ours_rate / theirs_rate:.2f}x"
                    )
                figures.append(
                    figure(
                        BENCHMARK,
                        name if len(our_times) == 1 else f"{name} (median of {len(our_times)} rounds)",
                        "store merge, Postgres",
                        ours_rate,
                        "records/s",
                        baseline="dlt merge",
                        baseline_value=theirs_rate,
                        ratio_at_least=TARGET_RATIO if load.has_target else None,
                    )
                )
            print()

            states = {"sync_project (newest_source_wins)": stale_case_store(store)}
            for label, dataset, hints in DLT_STALE_VARIANTS:
                states[label] = stale_case_dlt(url, workdir, dataset, **hints)
            print_stale_table(states)
            ours_right = _count_newest(states["sync_project (newest_source_wins)"])
            for label, _dataset, _hints in DLT_STALE_VARIANTS:
                figures.append(
                    figure(
                        BENCHMARK,
                        f"stale batch after a fresh one ({len(STALE_NEWEST)} records)",
                        "records left at their newest version",
                        ours_right,
                        f"of {len(STALE_NEWEST)}",
                        baseline=label,
                        baseline_value=_count_newest(states[label]),
                        value_at_least=len(STALE_NEWEST),
                    )
                )
        finally:
            client.close()
            engine.dispose()
            store.close()
    return figures


def _count_newest(state: dict[str, str]) -> int:
    return sum(1 for key, newest in STALE_NEWEST.items() if state[key] == newest)


def main(argv: Sequence[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help=f"dataset size (default {DATASET_RECORDS:,}; --quick: {QUICK_RECORDS:,})",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print where the store's loads spend their time (slows the store's side)"
    )
    args = parser.parse_args(argv)
    count = args.records or (QUICK_RECORDS if args.quick else DATASET_RECORDS)
    if count < 1000:
        parser.error("--records must be at least 1,000 (1% of it is deleted)")
    with isolated_dlt():
        figures = run(count, profile=args.profile)
    return publish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
