"""Benchmark: draining the inbox inside one webhook run (claim, on_webhook, merge, acknowledge).

    python benchmarks/drain.py [--events 50000] [--batch-size 500] [--backend postgres|sqlite|both]

The inbox is filled with pending events of one (sync, connection) first (not timed), then one
``drain_inbox`` call applies them all, timed. Events carry the full object (about 400 bytes of JSON),
so the handler is cheap and the figure is the drain machinery's own: claim rows, rebuild events,
validate changes, merge them under ``newest_source_wins``, mark the events done, commit. Two
workloads:

- ``unique``: every event saves a different record (the common case: many objects change);
- ``mixed``: 70% saves, 15% partial updates, 15% deletes over a pool of events/4 keys, so a batch
  holds several changes of one record and the drain must split merges to keep event order.

Each workload checks its outcome (every event done, record counts as expected) before printing, so
a fast but wrong drain cannot pass. Postgres runs in a fresh private schema, SQLite in a temporary
file; both are dropped afterwards. Postgres: ``SYNC_BENCH_POSTGRES_URL``, else
``SYNC_TEST_POSTGRES_URL``, else the local server's ``test`` database.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import private_postgres_schema  # noqa: E402

from sync_project.core import Delete, InboundEvent, Page, Save, SyncDefinition, Update, WebhookContext  # noqa: E402
from sync_project.orchestration.webhook_drain import drain_inbox  # noqa: E402
from sync_project.store import Store  # noqa: E402
from sync_project.store.inbox import RoutedEvent  # noqa: E402

EPOCH = datetime(2030, 1, 1, tzinfo=timezone.utc)


class Contact(BaseModel):
    id: str
    updated_at: datetime


def on_webhook(context: WebhookContext, event: InboundEvent) -> Iterator[object]:
    if event.event_type == "contact.updated":
        yield Save(event.payload)
    elif event.event_type == "contact.patched":
        yield Update(event.payload)
    else:
        yield Delete({"id": event.payload["id"]})


SYNC = SyncDefinition(
    provider="bench",
    name="contacts",
    model=Contact,
    fetch=lambda context: iter(() if context else [Page()]),
    updated_field="updated_at",
    webhook_events=("contact.updated", "contact.patched", "contact.deleted"),
    on_webhook=on_webhook,
)


def contact(key: str, version: int) -> dict[str, Any]:
    return {
        "id": key,
        "name": f"Contact {key}",
        "email": f"{key}@example.com",
        "phone": "+1-555-0100",
        "company": {"name": "Example Corp", "domain": "example.com", "size": 250},
        "tags": ["lead", "newsletter", "webinar-2030"],
        "owner": "owner-17",
        "lifecycle": "opportunity",
        "notes": "x" * 120,
        "updated_at": (EPOCH + timedelta(seconds=version)).isoformat(),
    }


def events_for(workload: str, count: int, seed: int = 7) -> list[RoutedEvent]:
    rng = random.Random(seed)
    pool = max(1, count // 4)
    events = []
    for i in range(count):
        if workload == "unique":
            kind, key = "contact.updated", f"c{i}"
        else:
            key = f"c{rng.randrange(pool)}"
            roll = rng.random()
            kind = "contact.updated" if roll < 0.70 else "contact.patched" if roll < 0.85 else "contact.deleted"
        payload = contact(key, i) if kind == "contact.updated" else {"id": key, "lifecycle": f"stage-{i % 5}"}
        events.append(
            RoutedEvent(
                event_key=f"evt-{i}",
                event_type=kind,
                account_id="acct",
                payload=payload,
                sync=SYNC.key,
                connection_id="bench",
            )
        )
    return events


def fill(store: Store, events: list[RoutedEvent]) -> None:
    for start in range(0, len(events), 5000):
        store.inbox.receive("bench", events[start : start + 5000])


def run_workload(store: Store, workload: str, count: int, batch_size: int) -> dict[str, Any]:
    with store.engine.begin() as conn:  # start each workload from an empty inbox and records
        # The work queue and acknowledgement tables too, where the schema has them (0007 on).
        for table in ("inbox_pending", "inbox_done", "inbox", "records", "feed_entries"):
            if sa.inspect(conn).has_table(table):
                conn.execute(sa.text(f"DELETE FROM {table}"))
    events = events_for(workload, count)
    fill(store, events)
    connection = store.connections.get("bench", "bench")
    log = logging.getLogger("bench.drain")
    with httpx.Client() as client:
        # As a webhook run drains: under the partition's drain lease, every batch fenced by it.
        with store.hold_lease(SYNC.key, "bench", "drain", f"drain-benchmark-{workload}") as keeper:
            started = time.perf_counter()
            result = drain_inbox(store, SYNC, connection, client, log, batch_size=batch_size, keeper=keeper)
            elapsed = time.perf_counter() - started
    if result.events_done != count or store.inbox.count(status="pending") != 0:
        raise SystemExit(f"{workload}: drained {result.events_done} of {count}; the drain is wrong")
    if workload == "unique" and store.count(SYNC.key, "bench") != count:
        raise SystemExit(f"unique: {store.count(SYNC.key, 'bench')} records for {count} events")
    return {
        "workload": workload,
        "events": count,
        "seconds": elapsed,
        "events_per_s": count / elapsed,
        "batches": result.batches,
        "merge": {k: v for k, v in result.merge.as_dict().items() if v},
    }


@contextmanager
def backend_store(backend: str) -> Iterator[Store]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder, Store(f"sqlite:///{folder}/bench.db") as store:
            yield store
        return
    with private_postgres_schema() as url, Store(url) as store:
        yield store


def main() -> int:
    # report.py stops a script that runs too long with SIGTERM: exit through the finally blocks,
    # which drop the private schema.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--backend", choices=["postgres", "sqlite", "both"], default="both")
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the figures there as a JSON list")
    parser.add_argument("--quick", action="store_true", help="5,000 events per workload")
    args = parser.parse_args()
    if args.quick:
        args.events = min(args.events, 5000)
    backends = ["postgres", "sqlite"] if args.backend == "both" else [args.backend]
    print(f"drain benchmark: {args.events} events per workload, batches of {args.batch_size}")
    figures = []
    for backend in backends:
        with backend_store(backend) as store:
            store.connections.add("bench", "bench", account_id="acct")
            for workload in ("unique", "mixed"):
                result = run_workload(store, workload, args.events, args.batch_size)
                print(
                    f"  {backend:<8} {workload:<7} {result['events_per_s']:>9,.0f} events/s "
                    f"({result['seconds']:.2f} s, {result['batches']} batches) merge {result['merge']}"
                )
                target = 10_000 if backend == "postgres" else None
                figures.append(
                    {
                        "benchmark": "drain",
                        "case": f"{backend}, {workload}, {args.events:,} events, batches of {args.batch_size}",
                        "metric": "events claimed, merged and acknowledged/s",
                        "value": result["events_per_s"],
                        "unit": "events/s",
                        "baseline": None,
                        "baseline_value": None,
                        "ratio": None,
                        "target": None if target is None else f">= {target:g} events/s",
                        "met": None if target is None else result["events_per_s"] >= target,
                    }
                )
    print(f"target: >= 10,000 events/s on Postgres ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
