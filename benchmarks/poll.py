"""Full refresh of 100k and 1M records from a paginated HTTP API on loopback.

What it measures: records/s end to end (HTTP fetch, JSON parse, pydantic validation, guarded merge,
per-page checkpoint, delete detection) through the real sync asset on a real Dagster instance, and
the run's peak RSS. Pages stream, so peak RSS should not grow with the number of records.

Each size runs in a fresh child process (so its peak RSS is its own); the API runs in another
process and synthesises records on the fly, so its memory is not counted either. If either child
dies, the benchmark ends within a second or two with its exit code (its traceback is on stderr).
Database connections: the run's store (at most 15, SQLAlchemy's pool) and one for the schema.

    python benchmarks/poll.py [--sizes 100000,1000000] [--backend sqlite|postgres] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import Reporting, exit_cleanly_on_sigterm, get_from_child, private_postgres_schema  # noqa: E402

if TYPE_CHECKING:  # the API runs in a child process: only it imports Starlette
    from starlette.applications import Starlette

PAGE_SIZE = 1000
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit " * 6


def synthetic_record(index: int) -> dict:
    """About 500 bytes of JSON, deterministic from its index."""
    return {
        "id": f"r{index:08d}",
        "email": f"person{index}@example.com",
        "name": f"Person {index}",
        "company": f"Company {index % 997}",
        "score": index % 1000,
        "notes": FILLER[: 250 + index % 50],
        "updated_at": (EPOCH + timedelta(microseconds=index)).isoformat().replace("+00:00", "Z"),
    }


def api_app(total: int) -> Starlette:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def items(request: Request) -> Response:
        start = int(request.query_params.get("cursor") or 0)
        end = min(start + PAGE_SIZE, total)
        body = {
            "items": [synthetic_record(i) for i in range(start, end)],
            "next_cursor": str(end) if end < total else None,
        }
        return Response(json.dumps(body), media_type="application/json")

    return Starlette(routes=[Route("/items", items)])


def serve_api(total: int, port_queue: multiprocessing.Queue) -> None:
    from sync_project.serving import BackgroundServer

    server = BackgroundServer(api_app(total)).start()
    port_queue.put(server.port)
    while True:
        time.sleep(3600)


def run_full_refresh(base_url: str, database_url: str, result_queue: multiprocessing.Queue) -> None:
    """In the child: one full-refresh run of the asset; reports throughput and peak RSS."""
    import dagster as dg
    from pydantic import BaseModel

    from sync_project.core import FetchContext, Page, SyncDefinition
    from sync_project.core.http import json_body
    from sync_project.orchestration.assets import SyncRunConfig, build_sync_asset
    from sync_project.orchestration.partitions import partitions_name
    from sync_project.orchestration.resources import StoreResource
    from sync_project.store import Store
    from sync_project_tests.orchestration.fake_api import FakeProvider

    class Person(BaseModel):
        id: str
        email: str
        name: str
        company: str
        score: int
        notes: str
        updated_at: datetime

    def fetch(ctx: FetchContext) -> Iterator[Page]:
        cursor: str | None = "0"
        while cursor is not None:
            body = json_body(ctx.client.get("/items", params={"cursor": cursor}))
            cursor = body["next_cursor"]
            yield Page(records=[Person.model_validate(raw) for raw in body["items"]], checkpoint={"cursor": cursor})

    people = SyncDefinition(provider="bench", name="people", model=Person, fetch=fetch, updated_field="updated_at")
    with Store(database_url) as store:
        store.connections.add("bench", "c1", config={"base_url": base_url})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(partitions_name("bench"), ["c1"])
        started = time.perf_counter()
        result = dg.materialize(
            [build_sync_asset(people, FakeProvider(name="bench"))],
            partition_key="c1",
            instance=instance,
            resources={"sync_store": StoreResource(database_url=database_url)},
            run_config=dg.RunConfig(ops={"bench__people": SyncRunConfig(mode="full")}),
        )
        elapsed = time.perf_counter() - started
    with Store(database_url) as store:
        stored = store.count("bench/people", "c1")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result_queue.put({"success": result.success, "seconds": elapsed, "records": stored, "peak_rss_mb": peak_kib / 1024})


@contextmanager
def private_database(backend: str, workdir: Path, label: str) -> Iterator[str]:
    """A database of this size's own, dropped afterwards even if the run failed."""
    if backend == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.db'}"
        return
    with private_postgres_schema("bench_poll") as url:
        yield url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--quick", action="store_true", help="20k and 100k records")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()  # report.py's timeout must still drop the private schema
    sizes = [20_000, 100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    context = multiprocessing.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            port_queue = context.Queue()
            api = context.Process(target=Reporting(serve_api, port_queue), args=(size, port_queue), daemon=True)
            api.start()
            base_url = f"http://127.0.0.1:{get_from_child(port_queue, [api], 30, 'the API server')}"
            print(f"full refresh of {size:,} records on {args.backend} ...", file=sys.stderr, flush=True)
            try:
                with private_database(args.backend, Path(tmp), str(size)) as database_url:
                    result_queue = context.Queue()
                    run = context.Process(
                        target=Reporting(run_full_refresh, result_queue), args=(base_url, database_url, result_queue)
                    )
                    run.start()
                    outcome: dict[str, Any] | None = None
                    try:
                        # Within a second of the run's (or the API's) death, with its exit code.
                        outcome = get_from_child(result_queue, [run, api], 3600, f"full refresh of {size:,}")
                    finally:
                        if outcome is not None:
                            # It reported and is exiting: terminated now, its finalizers would
                            # print a KeyboardInterrupt traceback.
                            run.join(10)
                        if run.is_alive():
                            run.terminate()
                        run.join(30)
            finally:
                api.terminate()
                api.join()
            if not outcome["success"] or outcome["records"] != size:
                print(f"run failed or incomplete: {outcome}", file=sys.stderr)
                return 1
            rows.append({"size": size, **outcome, "records_per_s": size / outcome["seconds"]})
    print(f"\nFull refresh through the sync asset ({args.backend} store, pages of {PAGE_SIZE})")
    print(f"{'records':>10} {'seconds':>9} {'records/s':>11} {'peak RSS MB':>12}")
    for row in rows:
        print(f"{row['size']:>10,} {row['seconds']:>9.1f} {row['records_per_s']:>11,.0f} {row['peak_rss_mb']:>12.0f}")
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] if len(rows) > 1 else None
    if growth is not None:
        print(
            f"peak RSS {rows[-1]['size']:,} / {rows[0]['size']:,}: {growth:.2f}x (target: under 300 MB and within 1.20x)"
        )
    if args.json_path:
        figures = []
        for row in rows:
            figures.append(
                {
                    "benchmark": "poll",
                    "case": f"full refresh {row['size']:,} ({args.backend})",
                    "metric": "records/s",
                    "value": row["records_per_s"],
                    "unit": "records/s",
                    "baseline": None,
                    "baseline_value": None,
                    "ratio": None,
                    "target": None,
                    "met": None,
                }
            )
            figures.append(
                {
                    "benchmark": "poll",
                    "case": f"full refresh {row['size']:,} ({args.backend})",
                    "metric": "peak RSS",
                    "value": row["peak_rss_mb"],
                    "unit": "MB",
                    "baseline": f"{rows[0]['size']:,} records" if row is not rows[0] else None,
                    "baseline_value": rows[0]["peak_rss_mb"] if row is not rows[0] else None,
                    "ratio": row["peak_rss_mb"] / rows[0]["peak_rss_mb"] if row is not rows[0] else None,
                    "target": "< 300 MB, within 1.20x",
                    "met": row["peak_rss_mb"] < 300
                    and (row is rows[0] or row["peak_rss_mb"] / rows[0]["peak_rss_mb"] <= 1.2),
                }
            )
        Path(args.json_path).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
