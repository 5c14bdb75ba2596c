"""Benchmark: durable webhook deliveries per second through the receiver, beside a bare endpoint.

    python benchmarks/receiver.py [--requests 30000] [--concurrency 64] [--max-seconds 30]
                                  [--backend postgres|sqlite] [--naive-requests 2000]

Three servers, each uvicorn (uvloop + httptools) in its own process on a loopback port, served the
same way and driven by the same load generator in the same run:

- ``bare``: a Starlette endpoint that reads the body and answers 202 (the ceiling: HTTP alone);
- ``receiver``: ``sync_project.receiver.create_app`` over a fresh store: verify the HMAC signature,
  parse, route against the connections table, group-commit to the inbox, then answer;
- ``one commit per delivery``: the same receiver with ``max_batch=1``, i.e. without group commit
  (the naive design), for scale.

The load generator is a raw asyncio HTTP/1.1 client (keep-alive, one request in flight per
connection, ``--concurrency`` connections) running in this process: httpx's client costs more CPU
per request than the server under test and would measure itself. Every request is a distinct,
signed delivery of about 500 bytes, prepared before the clock starts. A phase stops after its
request count or ``--max-seconds``, whichever comes first.

The limit is measured in the same run, on the same server (Postgres only): pgbench (Debian's
``postgresql-contrib``; ``--limit-clients`` connections, 32) inserting durable one-row
transactions, then 100-row ones (8 connections), into a table shaped like the inbox. The
receiver's durable deliveries/s are printed as a ratio to both.

Durability is checked, not assumed: after the run, the inbox must hold exactly one row per 202.
Postgres runs in a fresh private schema (dropped afterwards): ``SYNC_BENCH_POSTGRES_URL``, else
``SYNC_TEST_POSTGRES_URL``, else the local server's ``test`` database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import get_from_child, private_postgres_schema  # noqa: E402

SECRET = "bench-secret"
SECRET_ENV = "BENCH_WEBHOOK_SECRET"
SIGNATURE_HEADER = "x-bench-signature"


# -- the servers (run in child processes) ------------------------------------------------------------


def _bench_provider() -> Any:
    from dataclasses import dataclass as provider_dataclass

    from sync_project.core import InboundEvent, MalformedWebhookError, Provider, SignatureError, WebhookRequest

    @provider_dataclass
    class BenchProvider(Provider):
        """GitHub's scheme: hex HMAC-SHA256 of the raw body; one event per delivery."""

        def client(self, connection: Any) -> Any:
            raise NotImplementedError

        def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
            given = request.headers.get(SIGNATURE_HEADER, "").removeprefix("sha256=")
            for secret in secrets:
                if hmac.compare_digest(given, hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()):
                    return
            raise SignatureError("bad signature")

        def parse(self, request: WebhookRequest) -> list[InboundEvent]:
            document = json.loads(request.body)
            if not isinstance(document, dict) or "id" not in document:
                raise MalformedWebhookError("no event id")
            return [InboundEvent(document["id"], document["type"], document.get("account"), document["data"])]

    return BenchProvider(name="bench", webhook_secret_env=SECRET_ENV)


def _bench_sync() -> Any:
    from pydantic import BaseModel

    from sync_project.core import Save, SyncDefinition

    class Contact(BaseModel):
        id: str

    return SyncDefinition(
        provider="bench",
        name="contacts",
        model=Contact,
        fetch=lambda context: iter(()),
        webhook_events=("contact.updated",),
        on_webhook=lambda context, event: [Save(event.payload)],
    )


def _bare_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def accept(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"outcome": "stored", "bytes": len(body)}, status_code=202)

    return Starlette(routes=[Route("/webhooks/{provider}", accept, methods=["POST"])])


def serve(kind: str, database_url: str | None, max_batch: int, log_path: str, ready: Any, stats: Any) -> None:
    """Child process: serve one app on a free port, report the port, serve until SIGTERM/SIGINT."""
    import uvicorn

    from sync_project.cli.receiver import SWITCH_INTERVAL_S
    from sync_project.receiver.logs import configure_json_logging

    os.environ[SECRET_ENV] = SECRET
    log_file = open(log_path, "w")  # noqa: SIM115 - closed when the server stops
    listener = configure_json_logging(logging.INFO, log_file)
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # as `sync-project receiver` does
    store = None
    if kind == "bare":
        app = _bare_app()
    else:
        from sync_project.receiver import create_app
        from sync_project.store import Store

        store = Store(database_url)
        app = create_app(store, providers={"bench": _bench_provider()}, syncs=[_bench_sync()], max_batch=max_batch)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    ready.put(sock.getsockname()[1])
    config = uvicorn.Config(app, access_log=False, log_config=None, loop="uvloop", http="httptools", backlog=2048)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it shut down on
        uvicorn.Server(config).run(sockets=[sock])
    if kind != "bare":
        committer = app.state.committer
        stats.put((committer.commits, committer.committed_items))
    if store is not None:
        store.close()
    listener.stop()
    log_file.close()


@contextmanager
def server(
    kind: str, database_url: str | None, log_dir: str, max_batch: int = 1000
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Serve ``kind`` in a child process; on exit, shut it down and put its commit counts in the dict."""
    context = multiprocessing.get_context("spawn")
    ready, stats = context.Queue(), context.Queue()
    process = context.Process(
        target=serve, args=(kind, database_url, max_batch, f"{log_dir}/{kind}-{max_batch}.log", ready, stats)
    )
    process.start()
    report: dict[str, Any] = {}
    try:
        port = get_from_child(ready, [process], 60, f"the {kind} server")
        _wait_listening(port)
        yield port, report
    finally:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGINT)  # a graceful uvicorn shutdown, then the stats
        if kind != "bare":
            with contextlib.suppress(Exception):  # the figures print without it
                report["batches"] = stats.get(timeout=30)
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join(10)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


# -- the load generator --------------------------------------------------------------------------------


def deliveries(count: int, prefix: str) -> list[bytes]:
    """Distinct signed requests, built before the clock starts."""
    requests = []
    for i in range(count):
        body = json.dumps(
            {
                "id": f"{prefix}-{i}",
                "type": "contact.updated",
                "account": "acct-1",
                "data": {
                    "id": f"c{i % 5000}",
                    "name": f"Contact {i}",
                    "email": f"c{i}@example.com",
                    "company": {"name": "Example Corp", "domain": "example.com"},
                    "tags": ["lead", "newsletter"],
                    "notes": "n" * 200,
                    "updated_at": "2030-01-01T00:00:00+00:00",
                },
            }
        ).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        head = (
            "POST /webhooks/bench HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{SIGNATURE_HEADER}: sha256={signature}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    return requests


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    batches: tuple[int, int] | None = None

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def _load(port: int, requests: list[bytes], concurrency: int, max_seconds: float, phase: Phase) -> None:
    pending = iter(requests)
    deadline = time.perf_counter() + max_seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in pending:
                if time.perf_counter() > deadline:
                    return
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = 0
                close = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    lowered = name.strip().lower()
                    if lowered == b"content-length":
                        length = int(value)
                    elif lowered == b"connection" and value.strip().lower() == b"close":
                        close = True
                await reader.readexactly(length)
                phase.latencies.append(time.perf_counter() - started)
                phase.statuses[status] += 1
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - started


def drive(port: int, requests: list[bytes], concurrency: int, max_seconds: float, name: str) -> Phase:
    phase = Phase(name)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    runner(_load(port, requests, concurrency, max_seconds, phase))
    return phase


# -- the limit: the database alone ----------------------------------------------------------------------

#: pgbench scripts over a table shaped like the inbox (its columns, unique key and indexes):
#: durable one-row transactions, and 100-row ones. Every row is distinct, ~500 bytes of payload.
_ONE_ROW = (
    "INSERT INTO limit_inbox (provider, event_key, sync, connection_id, account_id, event_type, payload, status, "
    "attempts, received_at) VALUES ('bench', gen_random_uuid()::text, 'bench/contacts', 'bench-conn', 'acct-1', "
    "'contact.updated', '{\"id\": \"c1\", \"notes\": \"' || repeat('n', 450) || '\"}', 'pending', 0, now());\n"
)
_HUNDRED_ROWS = (
    "INSERT INTO limit_inbox (provider, event_key, sync, connection_id, account_id, event_type, payload, status, "
    "attempts, received_at) SELECT 'bench', gen_random_uuid()::text, 'bench/contacts', 'bench-conn', 'acct-1', "
    "'contact.updated', '{\"id\": \"c1\", \"notes\": \"' || repeat('n', 450) || '\"}', 'pending', 0, now() "
    "FROM generate_series(1, 100);\n"
)


def pgbench_limit(url: str, script: str, clients: int, seconds: float, work_dir: str) -> float:
    """Transactions/s pgbench reaches with ``clients`` connections running ``script`` for ``seconds``."""
    import re
    import shutil
    import subprocess
    from urllib.parse import unquote

    import sqlalchemy as sa

    binary = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"
    if not os.path.exists(binary):
        raise SystemExit("pgbench not found: install Debian's postgresql-contrib (or postgresql-client) package")
    parsed = sa.engine.make_url(url)
    path = Path(work_dir) / "script.sql"
    path.write_text(script)
    env = dict(os.environ, PGOPTIONS=unquote(str(parsed.query.get("options", ""))))
    command = [
        binary, "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(max(1, round(seconds))),
        "-f", str(path), "-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432),
        "-U", parsed.username or "postgres", parsed.database or "postgres",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"pgbench failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return float(found.group(1))


def measure_limit(url: str, clients: int, seconds: float, log_dir: str) -> tuple[float, float]:
    """(one-row commits/s, rows/s in 100-row transactions) of the database, on an inbox-shaped table."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE limit_inbox (LIKE inbox INCLUDING ALL)"))
        one_row = pgbench_limit(url, _ONE_ROW, clients, seconds, log_dir)
        batched = pgbench_limit(url, _HUNDRED_ROWS, min(clients, 8), seconds, log_dir) * 100
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE limit_inbox"))
    finally:
        engine.dispose()
    return one_row, batched


# -- the run -----------------------------------------------------------------------------------------


@contextmanager
def database(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    with private_postgres_schema() as url:
        yield url


def run_receiver(
    name: str, url: str, log_dir: str, requests: list[bytes], args: argparse.Namespace, max_batch: int
) -> Phase:
    with server("receiver", url, log_dir, max_batch=max_batch) as (port, report):
        drive(port, deliveries(500, f"warmup-{name}"), args.concurrency, 30, "warmup")
        phase = drive(port, requests, args.concurrency, args.max_seconds, name)
    phase.batches = report.get("batches")
    return phase


def figure(
    case: str,
    metric: str,
    value: float,
    unit: str,
    *,
    baseline: str | None = None,
    baseline_value: float | None = None,
    at_least: float | None = None,
) -> dict[str, Any]:
    """One figure in the JSON shape ``benchmarks/report.py`` reads (see ``_common.Figure``)."""
    ratio = value / baseline_value if baseline_value else None
    return {
        "benchmark": "receiver",
        "case": case,
        "metric": metric,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio,
        "target": None if at_least is None else f">= {at_least:g} {unit}",
        "met": None if at_least is None else value >= at_least,
    }


def main() -> int:
    # report.py stops a script that runs too long with SIGTERM: exit through the finally blocks,
    # which stop the servers and drop the private schema.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--naive-requests", type=int, default=2000, help="0 skips the one-commit-per-delivery phase")
    parser.add_argument("--limit-clients", type=int, default=32, help="pgbench connections for the one-row limit")
    parser.add_argument("--limit-seconds", type=float, default=10.0, help="each pgbench phase; 0 skips the limit")
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the figures there as a JSON list")
    parser.add_argument("--quick", action="store_true", help="5,000 deliveries per phase, 500 without group commit")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.naive_requests = min(args.requests, 5000), min(args.naive_requests, 500)

    from sync_project.store import Store

    with database(args.backend) as url, tempfile.TemporaryDirectory() as log_dir:
        with Store(url) as store:
            store.connections.add("bench", "bench-conn", account_id="acct-1")
        phases: list[Phase] = []
        with server("bare", None, log_dir) as (port, _):
            drive(port, deliveries(2000, "warmup-bare"), args.concurrency, 30, "warmup")
            phases.append(
                drive(port, deliveries(args.requests, "bare"), args.concurrency, args.max_seconds, "bare Starlette")
            )
        limit_one, limit_batched = (0.0, 0.0)
        if args.backend == "postgres" and args.limit_seconds > 0:
            # The limit, in the same run: the database alone, same server, same moment.
            limit_one, limit_batched = measure_limit(url, args.limit_clients, args.limit_seconds, log_dir)
        receiver = run_receiver("receiver", url, log_dir, deliveries(args.requests, "durable"), args, max_batch=1000)
        phases.append(receiver)
        if args.naive_requests:
            naive = deliveries(args.naive_requests, "naive")
            phases.append(run_receiver("one commit per delivery", url, log_dir, naive, args, max_batch=1))
        with Store(url) as store:
            stored = store.inbox.count(provider="bench")
        warmups = 500 * (1 + bool(args.naive_requests))
        accepted = sum(p.statuses[202] for p in phases[1:])
        if stored != accepted + warmups:
            print(f"durability check failed: {stored} inbox rows for {accepted + warmups} answers 202", file=sys.stderr)
            return 1

    bare = phases[0]
    print(
        f"receiver benchmark on {args.backend}: {args.concurrency} connections, "
        f"{args.requests} distinct signed deliveries per phase, {os.cpu_count()} cores shared by all "
        f"(load average {os.getloadavg()[0]:.1f} at the end)"
    )
    print(f"  {'phase':<24} {'answered/s':>11} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    for phase in phases:
        extra = ""
        if phase.batches:
            commits, items = phase.batches
            extra = f"  ({items / max(commits, 1):.1f} deliveries per commit)"
        print(
            f"  {phase.name:<24} {phase.per_second:>11,.0f} {phase.percentile(0.50):>8.1f} "
            f"{phase.percentile(0.99):>8.1f}  {dict(phase.statuses)}{extra}"
        )
    durable = receiver.statuses[202] / receiver.seconds
    print(f"durable deliveries/s: {durable:,.0f} (target >= 4,000); p99 {receiver.percentile(0.99):.1f} ms")
    print(f"receiver / bare Starlette: {receiver.per_second / bare.per_second:.2f}")
    if limit_one:
        print(
            f"limit (pgbench, {args.limit_clients} clients, inbox-shaped rows): {limit_one:,.0f} one-row commits/s, "
            f"{limit_batched:,.0f} rows/s in 100-row transactions; receiver / one-row limit "
            f"{durable / limit_one:.2f}x, / batched limit {durable / limit_batched:.3f}x (target >= 1.0x one-row)"
        )
    if len(phases) > 2:
        print(f"group commit / one commit per delivery: {receiver.per_second / phases[2].per_second:.1f}x")
    print(
        f"inbox rows checked: {stored} (one per 202, warm-ups included); mean latency "
        f"{statistics.fmean(receiver.latencies) * 1000:.1f} ms"
    )

    case = f"{args.backend}, {args.concurrency} connections, {args.requests:,} signed deliveries"
    figures = [
        figure(
            case,
            "durable deliveries/s",
            durable,
            "deliveries/s",
            baseline="bare Starlette",
            baseline_value=bare.per_second,
            at_least=4000,
        ),
        figure(
            case,
            "p99 latency",
            receiver.percentile(0.99),
            "ms",
            baseline="bare Starlette",
            baseline_value=bare.percentile(0.99),
        ),
    ]
    if limit_one:
        figures.append(
            figure(
                case,
                "durable deliveries/s",
                durable,
                "deliveries/s",
                baseline="one-row commit limit (pgbench)",
                baseline_value=limit_one,
            )
        )
        figures[-1]["target"], figures[-1]["met"] = ">= 1x one-row commit limit", durable >= limit_one
        figures.append(
            figure(
                case,
                "durable deliveries/s",
                durable,
                "deliveries/s",
                baseline="100-row transaction limit (pgbench, rows/s)",
                baseline_value=limit_batched,
            )
        )
    if len(phases) > 2:
        naive_phase = phases[2]
        figures.append(
            figure(
                f"{args.backend}, one commit per delivery, {args.naive_requests:,} deliveries",
                "durable deliveries/s",
                naive_phase.statuses[202] / naive_phase.seconds,
                "deliveries/s",
                baseline="group commit",
                baseline_value=durable,
            )
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
