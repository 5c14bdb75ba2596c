"""Benchmark: durable webhook deliveries per second through the receiver, beside a bare endpoint.

    python benchmarks/receiver.py [--requests 30000] [--concurrency 64] [--max-seconds 30]
                                  [--backend postgres|sqlite] [--naive-requests 2000]
                                  [--workers 1] [--writers N] [--done-events N]

Three servers, each uvicorn (uvloop + httptools) in its own process on a loopback port, served the
same way and driven by the same load generator in the same run:

- ``bare``: a Starlette endpoint that reads the body and answers 202 (the ceiling: HTTP alone);
- ``receiver``: ``sync_project.receiver.create_app`` over a fresh store: verify the HMAC signature,
  parse, route against the connections table, group-commit to the inbox, then answer
  (``--workers N``: N such processes on one port, as ``sync-project receiver --workers N``);
- ``one commit per delivery``: the same receiver with ``max_batch=1``, i.e. without group commit
  (the naive design), for scale.

The load generator is a raw asyncio HTTP/1.1 client (keep-alive, one request in flight per
connection, ``--concurrency`` connections) running in this process: httpx's client costs more CPU
per request than the server under test and would measure itself. Every request is a distinct,
signed delivery of about 500 bytes, prepared before the clock starts. A phase stops after its
request count or ``--max-seconds``, whichever comes first, and within a second of a server's
death (with its traceback). Each phase also reports the server's CPU time per answer, the figure
the machine's other load moves least, and how much of it the event-loop thread used: under the GIL
that one thread is a process's ceiling (the commit and log threads run beside it).

The limit is measured in the same run, on the same server (Postgres only): pgbench (Debian's
``postgresql-contrib``) inserting durable one-row transactions from ``--limit-clients`` connections
(64, or fewer when the shared server has not that many free), then 100-row ones (8 connections),
into a table shaped like the inbox. The one-row limit is measured again after the receiver's
phase (it is the disk's flush rate, which a shared host moves), and the mean of the two is the
baseline. The receiver's durable deliveries/s are printed as a ratio to both limits.

``--done-events N`` fills a second store's inbox with N done events first; receiver phases on it
alternate with phases on the empty one, and the mean of each is compared.

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
import itertools
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
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import (  # noqa: E402
    Reporting,
    bounded_clients,
    check_children,
    get_from_child,
    private_postgres_schema,
    watch_children,
)

SECRET = "bench-secret"
#: Deliveries sent to a receiver before its phase's clock starts.
WARMUP = 500
_PHASES = itertools.count()
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
                if hmac.compare_digest(given, hmac.digest(secret.encode(), request.body, "sha256").hex()):
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


def serve(
    kind: str,
    database_url: str | None,
    max_batch: int,
    writers: int | None,
    log_path: str,
    ready: Any,
    stats: Any,
    port: int | None = None,
) -> None:
    """Child process: serve one app on a free port, report the port, serve until SIGTERM/SIGINT.

    With ``port``, share that one (``SO_REUSEPORT``: the kernel spreads the connections over the
    processes listening on it), as ``sync-project receiver --workers N`` runs N processes.
    """
    import uvicorn

    from sync_project.receiver.factory import tune_serving_process
    from sync_project.receiver.logs import configure_json_logging

    os.environ[SECRET_ENV] = SECRET
    log_file = open(log_path, "w")  # noqa: SIM115 - closed when the server stops
    listener = configure_json_logging(logging.INFO, log_file)
    store = None
    if kind == "bare":
        app = _bare_app()
    else:
        from sync_project.receiver import create_app
        from sync_project.store import Store

        store = Store(database_url)  # its pool: the writers' connections and the health probe's
        from sync_project.cli.receiver import DEFAULT_WRITERS

        if writers is None:  # as `sync-project receiver` chooses
            writers = DEFAULT_WRITERS
        options: dict[str, Any] = {"writers": writers}
        app = create_app(
            store, providers={"bench": _bench_provider()}, syncs=[_bench_sync()], max_batch=max_batch, **options
        )
    tune_serving_process()  # as `sync-project receiver` does (the bare app too: the same process)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if port is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port or 0))
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
    kind: str,
    database_url: str | None,
    log_dir: str,
    max_batch: int = 1000,
    writers: int | None = None,
    workers: int = 1,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Serve ``kind`` in ``workers`` child processes on one port; on exit, shut them down and put
    their commit counts (summed) in the dict.

    The dict's ``watch`` is what :func:`drive` watches: the phase ends within a second of a
    server's death, with its traceback, instead of at its time limit.
    """
    context = multiprocessing.get_context("spawn")
    ready, stats = context.Queue(), context.Queue()
    processes: list[Any] = []
    report: dict[str, Any] = {"watch": (processes, f"the {kind} server", ready)}
    try:
        port: int | None = None if workers == 1 else 0
        for worker in range(workers):
            log_path = f"{log_dir}/{kind}-{max_batch}-{next(_PHASES)}-{worker}.log"
            process = context.Process(
                target=Reporting(serve, ready),
                args=(kind, database_url, max_batch, writers, log_path, ready, stats, port),
            )
            process.start()
            processes.append(process)
            port = get_from_child(ready, processes, 60, f"the {kind} server")
            assert port is not None
            _wait_listening(port, process)
        assert port is not None
        yield port, report
    finally:
        alive = [process for process in processes if process.is_alive()]
        for process in alive:
            if process.pid is not None:
                os.kill(process.pid, signal.SIGINT)  # a graceful uvicorn shutdown, then the stats
        if kind != "bare" and len(alive) == len(processes):
            with contextlib.suppress(Exception):  # the figures print without it
                counts = [get_from_child(stats, alive, 30, "the commit counts") for _ in alive]
                report["batches"] = (sum(c[0] for c in counts), sum(c[1] for c in counts))
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
                process.join(10)


def _wait_listening(port: int, process: Any) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.is_alive():
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
    #: CPU seconds the server process and this one (the load generator) used during the phase.
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    #: Of ``server_cpu_s``, what the servers' main threads used: uvicorn's event loop, which takes
    #: every request and, being one thread under the GIL, is each process's ceiling.
    server_loop_cpu_s: float = 0.0

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_cpu_us(self) -> float:
        """The server's CPU time per answer: what the cores cost, whatever else runs on them."""
        return self.server_cpu_s / self.answered * 1e6 if self.answered else float("nan")

    @property
    def server_loop_cpu_us(self) -> float:
        return self.server_loop_cpu_s / self.answered * 1e6 if self.answered else float("nan")

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def _load(
    port: int, requests: list[bytes], concurrency: int, max_seconds: float, phase: Phase, watch: Any
) -> None:
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
    load = asyncio.ensure_future(asyncio.gather(*(connection() for _ in range(concurrency))))
    watcher = asyncio.ensure_future(watch_children(*watch))
    try:
        either: list[asyncio.Future[Any]] = [load, watcher]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            load.cancel()
            watcher.result()  # raises ChildDiedError, with the server's traceback
        if load.exception() is not None:  # a reset socket: if the server is dying, say why it died
            for _ in range(4):
                check_children(*watch)
                await asyncio.sleep(0.5)
        load.result()
    finally:
        watcher.cancel()
    phase.seconds = time.perf_counter() - started


def drive(port: int, requests: list[bytes], concurrency: int, max_seconds: float, name: str, watch: Any) -> Phase:
    """Send ``requests`` over ``concurrency`` connections; ``watch`` is the server's (see :func:`server`)."""
    phase = Phase(name)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    pids = [process.pid for process in watch[0]]
    server_cpu, client_cpu = sum(map(_cpu_seconds, pids)), time.process_time()
    loop_cpu = sum(_cpu_seconds(pid, pid) for pid in pids)
    runner(_load(port, requests, concurrency, max_seconds, phase, watch))
    phase.server_cpu_s = sum(map(_cpu_seconds, pids)) - server_cpu
    phase.server_loop_cpu_s = sum(_cpu_seconds(pid, pid) for pid in pids) - loop_cpu
    phase.client_cpu_s = time.process_time() - client_cpu
    return phase


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` so far, or of its ``thread`` (a thread id; the
    main thread's is the pid) (Linux's /proc; 0 elsewhere)."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def measure_limit(url: str, clients: int, seconds: float, log_dir: str, *, batched: bool = True) -> tuple[float, float]:
    """(one-row commits/s, rows/s in 100-row transactions, 0 unless ``batched``) of the database,
    on an inbox-shaped table."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE limit_inbox (LIKE inbox INCLUDING ALL)"))
        one_row = pgbench_limit(url, _ONE_ROW, clients, seconds, log_dir)
        rows = pgbench_limit(url, _HUNDRED_ROWS, min(clients, 8), seconds, log_dir) * 100 if batched else 0.0
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE limit_inbox"))
    finally:
        engine.dispose()
    return one_row, rows


def fill_done_events(url: str, count: int) -> float:
    """Add ``count`` applied (done) events to the inbox as the drain leaves them, in 100k-row
    transactions, then VACUUM ANALYZE as autovacuum would; returns the seconds it took.

    Written as the schema stores them: an inbox row (stored status 'pending', taken out of
    ``inbox_pending``) and its id in ``inbox_done``.
    """
    import sqlalchemy as sa

    fill = sa.text(
        "WITH ins AS (INSERT INTO inbox (provider, event_key, sync, connection_id, account_id, event_type, payload, "
        "status, attempts, received_at) SELECT 'bench', 'done-' || g, 'bench/contacts', 'bench-conn', 'acct-1', "
        "'contact.updated', '{\"id\": \"c' || (g % 5000) || '\", \"notes\": \"' || repeat('n', 450) || '\"}', "
        "'pending', 1, now() - interval '1 day' FROM generate_series(:start, :stop) AS g RETURNING id) "
        "INSERT INTO inbox_done (id, processed_at) SELECT id, now() FROM ins"
    )
    started = time.perf_counter()
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        for start in range(0, count, 100_000):
            with engine.begin() as conn:
                conn.execute(fill, {"start": start, "stop": min(count, start + 100_000) - 1})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE inbox"))
            conn.execute(sa.text("VACUUM ANALYZE inbox_done"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


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
    # The one-commit-per-delivery phase is the naive design: one process, one commit at a time.
    workers, writers = (args.workers, args.writers) if max_batch > 1 else (1, 1)
    with server("receiver", url, log_dir, max_batch=max_batch, writers=writers, workers=workers) as (
        port,
        report,
    ):
        warmup = deliveries(WARMUP, f"warmup-{next(_PHASES)}")  # new ones each phase: all stored
        drive(port, warmup, args.concurrency, 30, "warmup", report["watch"])
        phase = drive(port, requests, args.concurrency, args.max_seconds, name, report["watch"])
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
    parser.add_argument(
        "--limit-clients",
        type=int,
        default=64,
        help="pgbench connections for the one-row limit (fewer if the server has not that many free)",
    )
    parser.add_argument(
        "--writers", type=int, default=None, help="the receiver's writers (default: as sync-project receiver)"
    )
    parser.add_argument("--workers", type=int, default=1, help="receiver processes sharing the port (group commit)")
    parser.add_argument(
        "--done-events",
        type=int,
        default=0,
        help="then fill the inbox with this many done events and measure the receiver again (0: skip)",
    )
    parser.add_argument("--limit-seconds", type=float, default=10.0, help="each pgbench phase; 0 skips the limit")
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the figures there as a JSON list")
    parser.add_argument("--quick", action="store_true", help="5,000 deliveries per phase, 500 without group commit")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.naive_requests = min(args.requests, 5000), min(args.naive_requests, 500)

    from sync_project.store import Store

    crowding = args.done_events > 0 and args.backend == "postgres"
    with (
        database(args.backend) as url,
        database(args.backend) if crowding else contextlib.nullcontext("") as crowded_url,
        tempfile.TemporaryDirectory() as log_dir,
    ):
        for each in filter(None, (url, crowded_url)):
            with Store(each) as store:
                store.connections.add("bench", "bench-conn", account_id="acct-1")
        if crowding:
            # A second store, filled first: its phases alternate with the empty store's, so a
            # change in the machine's load between phases does not pass for the done events' cost.
            print(f"filling an inbox with {args.done_events:,} done events ...", file=sys.stderr, flush=True)
            fill_seconds = fill_done_events(crowded_url, args.done_events)
            print(f"  filled in {fill_seconds:.0f} s", file=sys.stderr, flush=True)
        phases: list[Phase] = []
        with server("bare", None, log_dir) as (port, report):
            drive(port, deliveries(2000, "warmup-bare"), args.concurrency, 30, "warmup", report["watch"])
            phases.append(
                drive(
                    port,
                    deliveries(args.requests, "bare"),
                    args.concurrency,
                    args.max_seconds,
                    "bare Starlette",
                    report["watch"],
                )
            )
        limit_ones: list[float] = []
        limit_batched = 0.0
        limit_clients = 0
        measuring_limit = args.backend == "postgres" and args.limit_seconds > 0
        if measuring_limit:
            # The limit, in the same run: the database alone, same server, same moment. The server
            # is shared: fewer clients than asked if that many would leave it none to spare.
            limit_clients = bounded_clients(args.limit_clients, url)
            one_row, limit_batched = measure_limit(url, limit_clients, args.limit_seconds, log_dir)
            limit_ones.append(one_row)
        receiver = run_receiver("receiver", url, log_dir, deliveries(args.requests, "durable"), args, max_batch=1000)
        phases.append(receiver)
        if measuring_limit:
            # Once more after the receiver's phase: durable commits are the disk's flushes, and on a
            # shared host those alone moved the one-row limit by 2x between runs. The ratio is to
            # the mean, and both are printed.
            limit_ones.append(measure_limit(url, limit_clients, args.limit_seconds, log_dir, batched=False)[0])
        limit_one = statistics.fmean(limit_ones) if limit_ones else 0.0
        if args.naive_requests:
            naive = deliveries(args.naive_requests, "naive")
            phases.append(run_receiver("one commit per delivery", url, log_dir, naive, args, max_batch=1))
        empties, crowdeds = [receiver], []
        if crowding:
            name = f"receiver, {args.done_events:,} done"
            for round_ in range(2):  # crowded, empty, crowded: each beside an empty-inbox phase
                crowded_requests = deliveries(args.requests, f"crowded-{round_}")
                crowdeds.append(run_receiver(name, crowded_url, log_dir, crowded_requests, args, 1000))
                if round_ == 0:
                    again = deliveries(args.requests, "durable-again")
                    empties.append(run_receiver("receiver (again)", url, log_dir, again, args, 1000))
            phases += [crowdeds[0], empties[1], crowdeds[1]]
        stored = 0
        for each, its_phases, filled in ((url, [p for p in phases[1:] if p not in crowdeds], 0),
                                         (crowded_url, crowdeds, args.done_events)):  # fmt: skip
            if not each:
                continue
            with Store(each) as store:
                found = store.inbox.count(provider="bench")
            expected = sum(p.statuses[202] for p in its_phases) + WARMUP * len(its_phases) + filled
            if found != expected:
                print(f"durability check failed: {found} inbox rows, expected {expected}", file=sys.stderr)
                return 1
            stored += found

    bare = phases[0]
    print(
        f"receiver benchmark on {args.backend}: {args.concurrency} connections, "
        f"{args.requests} distinct signed deliveries per phase, {os.cpu_count()} cores shared by all "
        f"(load average {os.getloadavg()[0]:.1f} at the end)"
    )
    print(
        f"  {'phase':<24} {'answered/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'server CPU µs/answer':>21} "
        f"{'of it, event loop':>18}  statuses"
    )
    for phase in phases:
        extra = ""
        if phase.batches:
            commits, items = phase.batches
            extra = f"  ({items / max(commits, 1):.1f} deliveries per commit)"
        print(
            f"  {phase.name:<24} {phase.per_second:>11,.0f} {phase.percentile(0.50):>8.1f} "
            f"{phase.percentile(0.99):>8.1f} {phase.server_cpu_us:>21,.0f} {phase.server_loop_cpu_us:>18,.0f}  "
            f"{dict(phase.statuses)}{extra}"
        )
    durable = receiver.statuses[202] / receiver.seconds
    print(f"durable deliveries/s: {durable:,.0f} (target >= 4,000); p99 {receiver.percentile(0.99):.1f} ms")
    print(f"receiver / bare Starlette: {receiver.per_second / bare.per_second:.2f}")
    print(
        f"load generator CPU per request: {receiver.client_cpu_s / max(receiver.answered, 1) * 1e6:,.0f} µs "
        "(it shares the cores with the server)"
    )
    if limit_one:
        print(
            f"limit (pgbench, {limit_clients} clients, inbox-shaped rows): {limit_one:,.0f} one-row commits/s "
            f"(mean of {limit_ones[0]:,.0f} before the receiver's phase and {limit_ones[-1]:,.0f} after), "
            f"{limit_batched:,.0f} rows/s in 100-row transactions; receiver / one-row limit "
            f"{durable / limit_one:.2f}x, / batched limit {durable / limit_batched:.3f}x (target >= 1.0x one-row)"
        )
    if args.naive_requests:
        print(f"group commit / one commit per delivery: {receiver.per_second / phases[2].per_second:.1f}x")
    if crowdeds:
        empty_mean = statistics.fmean(p.statuses[202] / p.seconds for p in empties)
        crowded_mean = statistics.fmean(p.statuses[202] / p.seconds for p in crowdeds)
        print(
            f"with {args.done_events:,} done events in the inbox: {crowded_mean:,.0f} durable deliveries/s "
            f"(mean of {len(crowdeds)}), {crowded_mean / empty_mean:.2f}x the empty inbox's {empty_mean:,.0f} "
            f"(mean of {len(empties)}, alternated; target >= 0.90x)"
        )
    print(
        f"inbox rows checked: {stored} (one per 202, warm-ups included); mean latency "
        f"{statistics.fmean(receiver.latencies) * 1000:.1f} ms"
    )

    case = f"{args.backend}, {args.concurrency} connections, {args.requests:,} signed deliveries"
    if args.writers is not None:
        case += f", {args.writers} writers"
    if args.workers > 1:
        case += f", {args.workers} worker processes"
    figures = [
        figure(
            case,
            "durable deliveries/s",
            durable,
            "deliveries/s",
            baseline="bare Starlette",
            baseline_value=bare.per_second,
            at_least=4000 if args.workers == 1 else None,  # the target is for one process
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
    figures.append(
        figure(
            case,
            "server CPU per delivery",
            receiver.server_cpu_us,
            "µs",
            baseline="bare Starlette",
            baseline_value=bare.server_cpu_us,
        )
    )
    figures.append(
        figure(
            case,
            "event-loop thread CPU per delivery",
            receiver.server_loop_cpu_us,
            "µs",
            baseline="bare Starlette",
            baseline_value=bare.server_loop_cpu_us,
        )
    )
    if limit_one:
        figures.append(
            figure(
                case,
                "durable deliveries/s",
                durable,
                "deliveries/s",
                baseline=f"one-row commit limit (pgbench, {limit_clients} clients, mean of before and after)",
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
    if crowdeds:
        figures.append(
            figure(
                f"{case}, {args.done_events:,} done events in the inbox",
                "durable deliveries/s",
                crowded_mean,
                "deliveries/s",
                baseline="empty inbox (phases alternated)",
                baseline_value=empty_mean,
            )
        )
        figures[-1]["target"] = ">= 0.9x empty inbox (phases alternated)"
        figures[-1]["met"] = figures[-1]["ratio"] is not None and figures[-1]["ratio"] >= 0.9
    if args.naive_requests:
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
