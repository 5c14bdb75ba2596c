"""Benchmark: guarded merges through the records store against one bare guarded upsert statement.

    python benchmarks/merge.py [--records 200000] [--backend postgres|sqlite|both] [--page 5000]

Four phases over the same records (about 500 bytes of JSON each), under ``newest_source_wins``:

- ``fresh``: every record is new;
- ``newer``: every record comes back with a newer provider timestamp and new content;
- ``stale``: the first version again (older timestamp): every record must be skipped;
- ``unchanged``: the newer version again: every record is identical.

Each page of ``--page`` records goes through ``store.writer(...)`` (one transaction per page). Beside
it, the same page goes through ONE bare guarded ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``
statement into an identical table (psycopg2 ``execute_values`` on Postgres, ``executemany`` on
SQLite), also one transaction per page. Store and bare pages alternate, so both see the same machine
load; both start from the same Python dicts, so both pay for serialising them (canonical JSON, md5).

Postgres runs in a fresh private schema and SQLite in a temporary file; both are dropped afterwards.
Postgres is found through ``SYNC_BENCH_POSTGRES_URL``, else ``SYNC_TEST_POSTGRES_URL``, else the local
server's ``test`` database.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import re
import string
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync_project.store import Lease, MergeResult, MergeStrategy, RecordSpec, Store  # noqa: E402

DEFAULT_POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
SYNC = "bench/contacts"
CONNECTION = "bench"
SPEC = RecordSpec(primary_key="id", updated_field="updated_at", strategy=MergeStrategy.NEWEST_SOURCE_WINS)
PHASES = ("fresh", "newer", "stale", "unchanged")
#: What each phase must report, so a fast but wrong store cannot pass as a fast one.
EXPECTED = {"fresh": "added", "newer": "updated", "stale": "skipped_stale", "unchanged": "unchanged"}
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

Record = dict[str, Any]


# -- data -------------------------------------------------------------------------------------


def make_versions(count: int, seed: int = 7) -> tuple[list[Record], list[Record]]:
    """Two versions of ``count`` CRM-like contacts (~500 bytes of JSON each); v2 is newer."""
    rng = random.Random(seed)
    base = datetime(2024, 5, 1, tzinfo=timezone.utc)
    letters = string.ascii_letters

    def text(length: int) -> str:
        return "".join(rng.choices(letters, k=length))

    first: list[Record] = []
    second: list[Record] = []
    for i in range(count):
        created = base - timedelta(days=rng.randint(1, 900))
        record = {
            "id": f"c{i:08d}",
            "email": f"{text(8).lower()}@{text(6).lower()}.example",
            "first_name": text(7),
            "last_name": text(9),
            "phone": f"+1-555-{rng.randint(1000000, 9999999)}",
            "company": {"name": text(12), "domain": f"{text(8).lower()}.example", "employees": rng.randint(1, 5000)},
            "lifecycle_stage": rng.choice(["lead", "opportunity", "customer"]),
            "tags": [text(5) for _ in range(3)],
            "score": round(rng.random() * 100, 3),
            "active": True,
            "notes": text(120),
            "created_at": created.isoformat(),
            "updated_at": (base + timedelta(seconds=i)).isoformat(),
        }
        first.append(record)
        newer = dict(record)
        newer["lifecycle_stage"] = "customer" if record["lifecycle_stage"] != "customer" else "evangelist"
        newer["score"] = round(rng.random() * 100, 3)
        newer["updated_at"] = (base + timedelta(days=1, seconds=i)).isoformat()
        second.append(newer)
    return first, second


def pages(items: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the two contenders -----------------------------------------------------------------------


def store_page(store: Store, page: Sequence[Record], lease: Lease) -> MergeResult:
    """One page as a polling run writes it: under the run's lease, which the writer checks."""
    with store.writer(SYNC, CONNECTION, SPEC, lease=lease) as writer:
        return writer.save(page, fetched_at=datetime.now(timezone.utc))


def bare_rows(page: Sequence[Record]) -> list[tuple[str, str, str, str]]:
    """What the bare statement sends per row: the same canonical JSON and hash the store keeps."""
    rows = []
    for record in page:
        data = _ENCODER.encode(record)
        digest = hashlib.md5(data.encode(), usedforsecurity=False).hexdigest()
        rows.append((record["id"], data, digest, record["updated_at"]))
    return rows


_GUARDED_SET = """
    ON CONFLICT (sync, connection_id, external_id) DO UPDATE SET
        data = excluded.data, data_hash = excluded.data_hash,
        source_updated_at = excluded.source_updated_at, last_modified_at = excluded.last_modified_at,
        deleted_at = NULL, last_action = 'updated'
    WHERE bare_records.source_updated_at <= excluded.source_updated_at
      AND (bare_records.data_hash <> excluded.data_hash OR bare_records.deleted_at IS NOT NULL)
"""
_COLUMNS = "(sync, connection_id, external_id, data, data_hash, source_updated_at, first_seen_at, last_modified_at, last_action)"


def postgres_bare(engine: sa.Engine) -> Callable[[Sequence[Record]], None]:
    from psycopg2.extras import execute_values

    statement = f"INSERT INTO bare_records {_COLUMNS} VALUES %s {_GUARDED_SET}"
    # Constants in the template, the provider timestamp as the record's own text: the cheapest
    # way to feed this statement, so the store is measured against a fair, not a lazy, baseline.
    constants = f"'{SYNC}', '{CONNECTION}'"
    template = f"({constants}, %s, %s, %s, %s::timestamptz, now(), now(), 'added')"

    def write(page: Sequence[Record]) -> None:
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            try:
                execute_values(cursor, statement, bare_rows(page), template=template, page_size=len(page))
            finally:
                cursor.close()
            raw.commit()
        finally:
            raw.close()

    return write


def sqlite_bare(engine: sa.Engine) -> Callable[[Sequence[Record]], None]:
    # SQLite has no timestamp type: compare the same naive-UTC text the store keeps.
    statement = f"INSERT INTO bare_records {_COLUMNS} VALUES ('{SYNC}', '{CONNECTION}', ?, ?, ?, ?, ?, ?, 'added') {_GUARDED_SET}"

    def write(page: Sequence[Record]) -> None:
        now = _sqlite_time(datetime.now(timezone.utc))
        rows = [(*row[:3], _sqlite_time(datetime.fromisoformat(row[3])), now, now) for row in bare_rows(page)]
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(statement, rows)
            cursor.execute("COMMIT")
            cursor.close()
        finally:
            raw.close()

    return write


def _sqlite_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")


def create_bare_table(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("CREATE TABLE bare_records (LIKE records INCLUDING ALL)")
            # LIKE copies columns and indexes, not the table's storage parameters (fillfactor).
            options = conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE oid = 'records'::regclass").scalar()
            if options:
                conn.exec_driver_sql(f"ALTER TABLE bare_records SET ({', '.join(options)})")
        else:  # the table and every index of it, as in Postgres' LIKE ... INCLUDING ALL
            ddl = (
                conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE tbl_name = 'records' AND sql IS NOT NULL ORDER BY type DESC"
                )
                .scalars()
                .all()
            )
            for statement in ddl:
                # A table rebuilt by a migration (alembic batch mode) keeps its name quoted.
                statement = re.sub(r'\b(TABLE|ON) "?records"?(?=[ (])', r"\1 bare_records", statement, count=1)
                conn.exec_driver_sql(statement.replace("INDEX ix_", "INDEX bare_ix_"))


def tidy(engine: sa.Engine) -> None:
    """Start each phase from settled tables (dead tuples vacuumed, statistics fresh)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM ANALYZE records")
            conn.exec_driver_sql("VACUUM ANALYZE bare_records")
    else:
        raw = engine.raw_connection()  # outside a transaction, which the checkpoint needs
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()


# -- the run ----------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    records: int
    store_s: float = 0.0
    bare_s: float = 0.0
    counts: MergeResult = field(default_factory=MergeResult)

    @property
    def store_rate(self) -> float:
        return self.records / self.store_s

    @property
    def bare_rate(self) -> float:
        return self.records / self.bare_s


def run_backend(url: str, versions: tuple[list[Record], list[Record]], page_size: int) -> list[PhaseResult]:
    first, second = versions
    batches = {"fresh": first, "newer": second, "stale": first, "unchanged": second}
    results = []
    with Store(url) as store, store.leases.hold(SYNC, CONNECTION, "poll", "merge-benchmark") as keeper:
        create_bare_table(store.engine)
        bare = postgres_bare(store.engine) if store.backend == "postgresql" else sqlite_bare(store.engine)
        for phase in PHASES:
            tidy(store.engine)
            result = PhaseResult(phase, len(batches[phase]))
            label = f"{store.backend} {phase}"
            for page in tqdm(list(pages(batches[phase], page_size)), desc=label, unit="page", file=sys.stderr):
                started = time.perf_counter()
                result.counts += store_page(store, page, keeper.lease)
                result.store_s += time.perf_counter() - started
                started = time.perf_counter()
                bare(page)
                result.bare_s += time.perf_counter() - started
            got = getattr(result.counts, EXPECTED[phase])
            if got != result.records:
                raise SystemExit(f"{label}: expected {result.records} {EXPECTED[phase]}, store said {result.counts}")
            results.append(result)
    return results


@contextmanager
def postgres_url() -> Iterator[str]:
    base = os.environ.get("SYNC_BENCH_POSTGRES_URL") or os.environ.get("SYNC_TEST_POSTGRES_URL") or DEFAULT_POSTGRES
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        separator = "&" if "?" in base else "?"
        yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"


def print_table(backend: str, results: list[PhaseResult], targets: bool) -> None:
    print(f"\n{backend}: {results[0].records:,} records per phase")
    print(f"{'phase':<10} {'store rec/s':>12} {'bare rec/s':>12} {'store/bare':>11}  {'target':>7}  counts")
    for result in results:
        ratio = result.store_rate / result.bare_rate
        goal = (0.9 if result.phase in ("fresh", "newer") else 2.0) if targets else None
        verdict = "" if goal is None else f"{'>=' if ratio >= goal else '< '}{goal:.1f}x"
        counts = ", ".join(f"{k}={v}" for k, v in result.counts.as_dict().items() if v)
        print(
            f"{result.phase:<10} {result.store_rate:>12,.0f} {result.bare_rate:>12,.0f} {ratio:>10.2f}x  {verdict:>7}  {counts}"
        )


BASELINE = "bare INSERT ... ON CONFLICT DO UPDATE ... WHERE"
#: Targets of issue 2, against the bare statement on Postgres.
TARGETS = {"fresh": 0.9, "newer": 0.9, "stale": 2.0, "unchanged": 2.0}


def figures(backend: str, results: list[PhaseResult], targets: bool, page_size: int) -> list[dict[str, Any]]:
    """The figures in the JSON shape of benchmarks/report.py (one object per phase)."""
    out = []
    for result in results:
        ratio = result.store_rate / result.bare_rate
        goal = TARGETS[result.phase] if targets else None
        out.append(
            {
                "benchmark": "merge",
                "case": f"{result.phase} ({result.records:,} records, pages of {page_size:,})",
                "metric": f"store merge, {backend}",
                "value": result.store_rate,
                "unit": "records/s",
                "baseline": f"{BASELINE}, {backend}",
                "baseline_value": result.bare_rate,
                "ratio": ratio,
                "target": None if goal is None else f">= {goal:g}x {BASELINE}, {backend}",
                "met": None if goal is None else ratio >= goal,
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--backend", choices=("postgres", "sqlite", "both"), default="both")
    parser.add_argument("--page", type=int, default=5000, help="records per writer transaction")
    parser.add_argument("--quick", action="store_true", help="20,000 records instead of --records")
    parser.add_argument("--json", metavar="PATH", help="also write the figures there as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = 20_000

    print(f"generating {args.records:,} records x 2 versions", file=sys.stderr)
    versions = make_versions(args.records)
    # Millions of input objects are alive for the whole run; a real sync holds one page. Freeze
    # them out of the cyclic GC so its full collections do not tax whichever contender happens to
    # allocate when they trigger.
    gc.freeze()
    size = sum(len(_ENCODER.encode(r)) for r in versions[0][:1000]) / min(1000, args.records)
    print(f"average record: {size:.0f} bytes of canonical JSON; pages of {args.page:,}", file=sys.stderr)

    outcomes: list[tuple[str, list[PhaseResult]]] = []
    if args.backend in ("postgres", "both"):
        with postgres_url() as url:
            outcomes.append(
                (
                    "postgres (bare = execute_values INSERT ... ON CONFLICT DO UPDATE ... WHERE)",
                    run_backend(url, versions, args.page),
                )
            )
    if args.backend in ("sqlite", "both"):
        with sqlite_url() as url:
            outcomes.append(
                (
                    "sqlite (bare = executemany INSERT ... ON CONFLICT DO UPDATE ... WHERE)",
                    run_backend(url, versions, args.page),
                )
            )
    for backend, results in outcomes:
        print_table(backend, results, targets=backend.startswith("postgres"))
    if args.json:
        found = [
            item
            for backend, results in outcomes
            for item in figures(backend.split()[0], results, backend.startswith("postgres"), args.page)
        ]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
