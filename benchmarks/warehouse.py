"""The warehouse load against dlt alone: the store's change feed into DuckDB and Postgres, beside
dlt loading the same rows straight from a Python list.

What is measured (issue 21), in one run on one machine:

1. **initial load**: 200k records of ~500 bytes of JSON (the dataset of ``_common.py``) are
   saved into a records store (a SQLite file, the embedded default; filled before any clock
   starts), then ``Warehouse.load`` brings them into an empty table: it reads the change feed in
   pages of 5,000 and hands each page to one ``dlt`` run (merge on connection + id, typed columns
   from the model, the cursor in dlt's state).
2. **changes**: 20% of the records updated and 1% deleted in the store (one batch each per page),
   then the next ``Warehouse.load`` reads those 42k changes from the committed cursor and merges them.

The peer, each step: ``dlt.pipeline(...).run`` of the very rows the warehouse load produced (read
from the feed beforehand, untimed), from a list in memory, with the same resource hints, into a
dataset of its own on the same destination, in the same file format (``parquet`` for DuckDB). Records/s = rows loaded / wall-clock seconds; the
ratio (warehouse / dlt) is what reading the feed, and starting each load from the destination's
state in a fresh working folder, cost. Both final tables are checked against the store's live
records after each step (same ids and ``updated_at``): a fast wrong load is no figure.

**Memory**: the initial load of 100k, 500k and 1M records (``--memory-sizes``) into DuckDB and
into Postgres (``--memory-destinations``), with the warehouse's default settings, each load in a
child process of its own; the figure is the child's peak RSS (for Postgres the loading process,
not the server). Flat: every size within 15 % of the smallest. The feed is read in pages, dlt
writes them to files as they come, and DuckDB's buffers are capped (``memory_limit``, 128MB by
default; uncapped they grew with the rows merged: 394 MB at 100k, 670 MB at 500k).

Run: ``.venv/bin/python benchmarks/warehouse.py [--records N | --quick] [--memory-sizes A,B,C]
[--memory-destinations duckdb,postgres] [--skip-loads | --skip-memory] [--json PATH]``.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import random
import resource
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from _common import (
    DATASET_EPOCH,
    DATASET_RECORDS,
    PAGE_SIZE,
    SEED,
    Figure,
    Reporting,
    Stopwatch,
    benchmark_parser,
    exit_cleanly_on_sigterm,
    figure,
    get_from_child,
    make_dataset,
    modified,
    private_postgres_database,
    publish,
    record_bytes,
    sample_indexes,
)
from _dlt_peer import DELETED_FRACTION, UPDATED_FRACTION, check_versions, dlt_credentials, isolated_dlt
from pydantic import AwareDatetime, BaseModel

from sync_project.core.sync import SyncDefinition
from sync_project.store import Store
from sync_project.warehouse import Warehouse, WarehouseSettings
from sync_project.warehouse.columns import primary_key, table_columns, table_name
from sync_project.warehouse.load import _row

BENCHMARK = "warehouse"
CONNECTION = "bench"
QUICK_RECORDS = 20_000
DEFAULT_MEMORY_SIZES = (100_000, 500_000, 1_000_000)
#: "Flat": every size's peak RSS within 15 % of the smallest size's.
MEMORY_FLAT_RATIO = 1.15
QUICK_MEMORY_SIZES = (10_000, 50_000)


class Address(BaseModel):
    street: str
    city: str
    postal_code: str


class Contact(BaseModel):
    """The dataset's records (``_common.make_record``) as a sync's model."""

    id: str
    updated_at: AwareDatetime
    email: str
    first_name: str
    last_name: str
    company: str
    phone: str
    lifecycle_stage: str
    owner_id: int
    score: float
    is_active: bool
    address: Address
    notes: str


def _no_fetch(ctx: Any) -> Any:
    return iter(())


SYNC = SyncDefinition(provider="bench", name="contacts", model=Contact, fetch=_no_fetch, updated_field="updated_at")


# -- the store ----------------------------------------------------------------------------------


def fill(store: Store, records: Sequence[dict[str, Any]]) -> None:
    for start in range(0, len(records), PAGE_SIZE):
        store.save(SYNC.key, CONNECTION, SYNC.record_spec, records[start : start + PAGE_SIZE])


def change(store: Store, records: list[dict[str, Any]]) -> tuple[int, int]:
    """20% updated, 1% deleted, in pages; returns (updated, deleted)."""
    rng = random.Random(SEED + 21)
    count = len(records)
    updated = sample_indexes(count, UPDATED_FRACTION, rng)
    deleted = sample_indexes(count, DELETED_FRACTION, rng, exclude=updated)
    at = DATASET_EPOCH + timedelta(days=1)
    new = [modified(records[i], rng, at + timedelta(milliseconds=i)) for i in updated]
    fill(store, new)
    markers = [{"id": records[i]["id"], "updated_at": (at + timedelta(hours=1)).isoformat()} for i in deleted]
    for start in range(0, len(markers), PAGE_SIZE):
        store.delete(SYNC.key, CONNECTION, SYNC.record_spec, markers[start : start + PAGE_SIZE])
    return len(updated), len(deleted)


def feed_rows(store: Store, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The rows a warehouse load makes of the feed after ``cursor``: the peer's input."""
    rows: list[dict[str, Any]] = []
    while True:
        page = store.changes(SYNC.key, CONNECTION, cursor=cursor, limit=PAGE_SIZE)
        rows += [_row(c) for c in page.records]
        cursor = page.next_cursor
        if not page.has_more:
            return rows, cursor


def live_versions(store: Store) -> dict[str, datetime]:
    rows, _ = feed_rows(store, None)
    return {
        r["id"]: datetime.fromisoformat(r["updated_at"].replace("Z", "+00:00"))
        for r in rows
        if r["_deleted_at"] is None
    }


# -- the destinations ---------------------------------------------------------------------------


class Side:
    """One destination: the warehouse's settings and a peer pipeline into a dataset of its own."""

    def __init__(self, name: str, settings: WarehouseSettings, workdir: Path, reader: Any) -> None:
        import dlt

        self.name = name
        self.warehouse = Warehouse(settings)
        self.peer = dlt.pipeline(
            pipeline_name=f"peer_{name}",
            pipelines_dir=str(workdir / f"peer_{name}"),
            destination=self.warehouse._destination(),
            dataset_name="peer",
        )
        self.reader = reader  # (dataset, table) -> {id: (updated_at, deleted_at)}
        self.workdir = workdir

    def warm_up(self) -> None:
        """One small load each way into scratch datasets, untimed: the first load in a process
        imports dlt's normalizers, pyarrow and the destination's driver (a second or more), which
        the side that happened to go first would otherwise pay alone."""
        import dlt

        with Store(f"sqlite:///{self.workdir / f'warmup_{self.name}.db'}") as store:
            fill(store, make_dataset(100))
            Warehouse(self.warehouse.config.model_copy(update={"dataset": "warmup"})).load(store, SYNC, CONNECTION)
            rows, _ = feed_rows(store, None)
        pipeline = dlt.pipeline(
            pipeline_name=f"warmup_{self.name}",
            pipelines_dir=str(self.workdir / f"warmup_{self.name}"),
            destination=self.warehouse._destination(),
            dataset_name="warmup_peer",
        )
        pipeline.run(
            self._resource(rows),
            loader_file_format=self.warehouse.config.file_format(),  # type: ignore[arg-type]  # None: the destination's choice, as dlt's own default
        ).raise_on_failed_jobs()

    def flush(self) -> None:
        """The destination's dirty pages written out, untimed: without it whichever side goes
        second would pay for writing out the first's rows (DuckDB checkpoints its WAL, Postgres
        its buffers)."""
        import dlt

        with dlt.pipeline(
            pipeline_name=f"flush_{self.name}",
            pipelines_dir=str(self.workdir / f"flush_{self.name}"),
            destination=self.warehouse._destination(),
            dataset_name="peer",
        ).sql_client() as client:
            try:
                client.execute_sql("CHECKPOINT")
            except Exception:  # noqa: BLE001 - Postgres: not a superuser; the figures are noisier, no less valid
                pass

    def _resource(self, rows: list[dict[str, Any]]) -> Any:
        import dlt

        return dlt.resource(
            rows,
            name=table_name(SYNC),
            write_disposition="merge",
            primary_key=primary_key(SYNC),
            columns=table_columns(SYNC, self.warehouse.config.deletes),
        )  # type: ignore[call-overload]  # as in Warehouse.load: dlt's column hints are TypedDicts

    def load_peer(self, rows: list[dict[str, Any]]) -> None:
        self.peer.run(
            self._resource(rows),
            loader_file_format=self.warehouse.config.file_format(),  # type: ignore[arg-type]  # None: the destination's choice, as dlt's own default
        ).raise_on_failed_jobs()

    def check(self, dataset: str, expected: dict[str, datetime]) -> None:
        found = {
            key: updated
            for key, (updated, deleted) in self.reader(dataset, table_name(SYNC)).items()
            if deleted is None
        }
        check_versions(f"{self.name}/{dataset}", found, expected)


def duckdb_reader(path: Path) -> Any:
    def read(dataset: str, table: str) -> dict[str, tuple[datetime, datetime | None]]:
        import duckdb

        with duckdb.connect(str(path)) as conn:
            return {
                k: (u, d)
                for k, u, d in conn.execute(f"SELECT id, updated_at, _deleted_at FROM {dataset}.{table}").fetchall()
            }

    return read


def postgres_reader(url: str) -> Any:
    def read(dataset: str, table: str) -> dict[str, tuple[datetime, datetime | None]]:
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.text(f'SELECT id, updated_at, _deleted_at FROM "{dataset}".{table}')).all()
        finally:
            engine.dispose()
        return {k: (u, d) for k, u, d in rows}

    return read


def measure_side(side: Side, store: Store, steps: list[tuple[str, Any]]) -> list[Figure]:
    """Each step changes the store (untimed), then the warehouse load and the peer's, timed, each
    after a collection and a checkpoint; who goes first alternates from step to step."""
    figures: list[Figure] = []
    peer_cursor: str | None = None
    side.warm_up()
    for number, (case, prepare) in enumerate(steps):
        prepare()
        rows, peer_cursor = feed_rows(store, peer_cursor)
        expected = live_versions(store)
        timings: dict[str, float] = {}
        for who in ("ours", "theirs") if number % 2 == 0 else ("theirs", "ours"):
            side.flush()
            gc.collect()
            with Stopwatch() as watch:
                if who == "ours":
                    result = side.warehouse.load(store, SYNC, CONNECTION)
                else:
                    side.load_peer(rows)
            timings[who] = watch.seconds
        if result.rows != len(rows):
            raise RuntimeError(f"{side.name}: the warehouse loaded {result.rows} rows, the feed had {len(rows)}")
        side.check(side.warehouse.config.dataset, expected)
        side.check("peer", expected)
        ours_rate, theirs_rate = len(rows) / timings["ours"], len(rows) / timings["theirs"]
        print(
            f"{side.name}, {case}: warehouse {timings['ours']:.2f} s ({ours_rate:,.0f} rows/s),"
            f" dlt from a list {timings['theirs']:.2f} s ({theirs_rate:,.0f} rows/s), {ours_rate / theirs_rate:.2f}x",
            flush=True,
        )
        figures.append(
            figure(
                BENCHMARK,
                case,
                f"warehouse load, {side.name}",
                ours_rate,
                "records/s",
                baseline="dlt from a list",
                baseline_value=theirs_rate,
            )
        )
    return figures


def run_loads(count: int) -> list[Figure]:
    records = make_dataset(count)
    print(f"dataset: {count:,} records, {record_bytes(records):.0f} bytes of JSON each on average", flush=True)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="warehouse-bench-") as tmp, private_postgres_database("bench_wh") as pg_url:
        workdir = Path(tmp)
        duck = workdir / "warehouse.duckdb"
        sides = [
            Side(
                "DuckDB",
                WarehouseSettings(destination="duckdb", credentials=str(duck), dataset="synced", deletes="soft"),
                workdir,
                duckdb_reader(duck),
            ),
            Side(
                "Postgres",
                WarehouseSettings(
                    destination="postgres", credentials=dlt_credentials(pg_url), dataset="synced", deletes="soft"
                ),
                workdir,
                postgres_reader(pg_url),
            ),
        ]
        for side in sides:
            # A store of its own per destination, so each side's initial load starts from an empty feed cursor.
            with Store(f"sqlite:///{workdir / f'store_{side.name}.db'}") as store:
                counts: dict[str, int] = {}

                def initial() -> None:
                    fill(store, records)

                def changes() -> None:
                    counts["updated"], counts["deleted"] = change(store, records)  # noqa: B023 - run in this iteration

                updated, deleted = round(count * UPDATED_FRACTION), round(count * DELETED_FRACTION)
                figures += measure_side(
                    side,
                    store,
                    [
                        (f"initial load, {count:,} records", initial),
                        (f"changes: {updated:,} updated + {deleted:,} deleted of {count:,}", changes),
                    ],
                )
    return figures


# -- memory -------------------------------------------------------------------------------------


def _fill_child(count: int, workdir: str, results: Any) -> None:
    """Fills the store in a process of its own: the dataset's list is not the load's memory."""
    with Store(f"sqlite:///{workdir}/store_{count}.db") as store:
        fill(store, make_dataset(count))
    results.put(_peak_rss_kib())


def memory_settings(destination: str, count: int, workdir: str, pg_url: str | None) -> WarehouseSettings:
    """The warehouse as deployed (default settings, DuckDB's memory cap included), one table per size."""
    if destination == "duckdb":
        return WarehouseSettings(destination="duckdb", credentials=f"{workdir}/memory_{count}.duckdb", dataset="synced")
    assert pg_url is not None
    return WarehouseSettings(destination="postgres", credentials=dlt_credentials(pg_url), dataset=f"synced_{count}")


def _load_child(count: int, workdir: str, destination: str, pg_url: str | None, results: Any) -> None:
    with Store(f"sqlite:///{workdir}/store_{count}.db", migrate_schema=False) as store:
        warehouse = Warehouse(memory_settings(destination, count, workdir, pg_url))
        with Stopwatch() as watch:
            result = warehouse.load(store, SYNC, CONNECTION)
        if result.rows != count:
            raise RuntimeError(f"{destination}: loaded {result.rows} of {count} records")
    results.put((_peak_rss_kib(), watch.seconds))


def _peak_rss_kib() -> int:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux keeps that across ``execve``, so a
    spawned child reports its parent's peak (here, the loads' dataset) whenever that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _in_child(target: Any, *args: Any) -> Any:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    what = f"{target.__name__}({args[0]}, ...)"
    child = context.Process(target=Reporting(target, results), args=(*args, results), name=target.__name__)
    child.start()
    # Within a second of the child's death, with its traceback (a bare get() waited 30 minutes).
    value = get_from_child(results, [child], 3600, what)
    child.join(timeout=60)
    if child.exitcode != 0:
        raise RuntimeError(f"{what} exited with {child.exitcode}")
    return value


DESTINATION_NAMES = {"duckdb": "DuckDB", "postgres": "Postgres"}


def run_memory(sizes: Sequence[int], destinations: Sequence[str]) -> list[Figure]:
    """Each size: the store filled in one child, then one initial load per destination, each in a
    child of its own (a fresh process: its peak is that load's alone). For Postgres the figure is
    the loading process (Python, dlt); the server's memory is its own configuration's."""
    figures: list[Figure] = []
    peaks: dict[tuple[str, int], float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="warehouse-mem-") as tmp,
        private_postgres_database("bench_whmem") if "postgres" in destinations else contextlib.nullcontext() as pg_url,
    ):
        for count in sizes:
            _in_child(_fill_child, count, tmp)
            for destination in destinations:
                kib, seconds = _in_child(_load_child, count, tmp, destination, pg_url)
                peaks[destination, count] = kib / 1024
                print(
                    f"memory: initial load of {count:,} records into {DESTINATION_NAMES[destination]},"
                    f" peak RSS {kib / 1024:.0f} MB ({seconds:.0f} s, {count / seconds:,.0f} records/s)",
                    flush=True,
                )
            Path(tmp, f"store_{count}.db").unlink()
    small = sizes[0]
    for destination in destinations:
        for count in sizes:
            figures.append(
                figure(
                    BENCHMARK,
                    f"initial load into {DESTINATION_NAMES[destination]}, {count:,} records",
                    "peak RSS",
                    peaks[destination, count],
                    "MB",
                    baseline=f"peak RSS at {small:,}" if count != small else None,
                    baseline_value=peaks[destination, small] if count != small else None,
                    ratio_at_most=MEMORY_FLAT_RATIO if count != small else None,
                )
            )
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--records",
        type=int,
        default=None,
        help=f"dataset size of the loads (default {DATASET_RECORDS:,}; --quick: {QUICK_RECORDS:,})",
    )
    parser.add_argument(
        "--memory-sizes",
        default=None,
        help="record counts of the memory runs, comma-separated (default 100000,500000,1000000; --quick 10000,50000)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="only the loads")
    parser.add_argument(
        "--memory-destinations",
        default="duckdb,postgres",
        help="destinations of the memory runs, comma-separated (default duckdb,postgres)",
    )
    parser.add_argument("--skip-loads", action="store_true", help="only the memory runs")
    args = parser.parse_args(argv)
    count = args.records or (QUICK_RECORDS if args.quick else DATASET_RECORDS)
    if count < 1000:
        parser.error("--records must be at least 1,000 (1% of it is deleted)")
    try:
        sizes = (
            tuple(int(s) for s in args.memory_sizes.split(","))
            if args.memory_sizes
            else (QUICK_MEMORY_SIZES if args.quick else DEFAULT_MEMORY_SIZES)
        )
    except ValueError:
        parser.error("--memory-sizes takes record counts separated by commas, e.g. 100000,1000000")
    with isolated_dlt():
        figures = [] if args.skip_loads else run_loads(count)
        if not args.skip_memory:
            destinations = [d.strip() for d in args.memory_destinations.split(",") if d.strip()]
            if not destinations or set(destinations) - DESTINATION_NAMES.keys():
                parser.error("--memory-destinations takes duckdb and/or postgres")
            figures += run_memory(sizes, destinations)
    return publish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
