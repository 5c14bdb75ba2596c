"""End-to-end latency under ``make run``: from a webhook delivery accepted by the receiver to its
record merged into the store, p50, p95 and p99, in three cases.

It starts ``sync-project dev`` (sandbox, receiver, ``dagster dev`` with the project's dagster.yaml,
SQLite) in a private data folder and Dagster home, lets the first polls finish, then:

* **steady**: one sandbox change every ``--interval`` seconds, alternating the two demo
  connections and contacts/deals, so every partition has traffic and a standing drainer;
* **polled**: the same traffic while every partition is also being polled: full polls of all
  four partitions are submitted to the run queue (``dagster job launch``, as the schedules do)
  again and again, so one is in progress or queued for each partition the whole time;
* **cold**: the first event of a partition that has no drainer. The case waits until the
  partition's drain lease has been free for ``--quiet`` seconds (its standing drainer ended after
  lingering 5 min without events, and the provider's standby drainer let it go), then sends one
  change, partition after partition, ``--cold-rounds`` times. This stands for "quiet for an
  hour": once the drainer has ended, nothing about a partition changes with more quiet (no run,
  no process, no lease), so the next event pays exactly what it would after an hour: a wake-up
  of the provider's standby drainer and its claim (before the standby existed: a sensor tick,
  the run queue, a new run process and its step start).

Each change is one webhook; its inbox row holds ``received_at`` (committed before the receiver
answered) and ``processed_at`` (committed in the transaction of the merge), so the difference is
exactly "accepted -> merged". The machine's load average is printed with the figures.

    python benchmarks/e2e_latency.py [--changes 60] [--interval 1.0] [--quiet 10] [--cold-rounds 3] [--json PATH] [--quick]
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import Figure, benchmark_parser, exit_cleanly_on_sigterm, figure, publish  # noqa: E402

from sync_project.sandbox.client import SandboxAdmin  # noqa: E402
from sync_project.store import Store  # noqa: E402

BENCHMARK = "e2e_latency"
ACCOUNTS = {"demo-1": "acct-1", "demo-2": "acct-2"}
SYNCS = {"sandbox/contacts": 0.0, "sandbox/deals": 1.0}  # the change mix's deal_share for each
TARGETS = {"steady": (2.0, 4.0), "polled": (2.0, 4.0), "cold": (8.0, None)}
#: How long the stack's standing drainers linger without events (sensors.DEFAULT_WEBHOOK_LINGER_S),
#: and room for their runs to end.
LINGER_S = 300.0
MERGE_WAIT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


class Stack:
    """``sync-project dev`` in a private data folder and Dagster home."""

    def __init__(self, tmp: Path) -> None:
        self.data, self.home = tmp / "data", tmp / "home"
        self.admin_token = "adm_" + secrets.token_urlsafe(16)
        self.env = {
            **os.environ,
            "SYNC_DATA_DIR": str(self.data),
            "DAGSTER_HOME": str(self.home),
            "SYNC_SANDBOX_ADMIN_TOKEN": self.admin_token,
        }
        self.env.pop("SYNC_DATABASE_URL", None)
        self.ui, self.receiver, self.sandbox = free_port(), free_port(), free_port()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sync_project.cli",
                "dev",
                "--ui-port",
                str(self.ui),
                "--receiver-port",
                str(self.receiver),
                "--sandbox-port",
                str(self.sandbox),
                "--change-rate",
                "0",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if "Ctrl-C stops everything" in line:
                # Keep reading its output, or dagster dev blocks on a full pipe.
                threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()  # type: ignore[union-attr]
                return
        raise RuntimeError("sync-project dev exited early")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def launch_poll(self, sync: str, connection_id: str) -> None:
        provider, name = sync.split("/")
        tags = {
            "dagster/partition": connection_id,
            "sync/asset_partition": f"{sync}:{connection_id}:poll",
            "sync/mode": "full",
        }
        subprocess.run(
            [
                str(Path(sys.executable).parent / "dagster"),
                "job",
                "launch",
                "-w",
                str(ROOT / "workspace.yaml"),
                "-j",
                f"{provider}__{name}_job",
                "--tags",
                json.dumps(tags),
                "--config-json",
                json.dumps({"ops": {f"{provider}__{name}": {"config": {"mode": "full"}}}}),
            ],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=180,
        )


def traffic(admin: SandboxAdmin, changes: int, interval: float) -> None:
    partitions = [(account, share) for account in ACCOUNTS.values() for share in SYNCS.values()]
    for n in range(changes):
        account, share = partitions[n % len(partitions)]
        admin.apply_changes(1, account_id=account, create=1, update=3, delete=0, deal_share=share)
        time.sleep(interval)


def merged_latencies(store: Store, after_id: int, expected: int) -> list[float]:
    deadline = time.monotonic() + MERGE_WAIT_S
    while True:
        events = store.inbox.events(status="done", after_id=after_id, limit=10_000)
        if len(events) >= expected or time.monotonic() > deadline:
            return [(e.processed_at - e.received_at).total_seconds() for e in events if e.processed_at]
        time.sleep(0.5)


def polling(stack: Stack, stop: threading.Event) -> None:
    """Keep a full poll of every partition queued or running until ``stop``."""
    while not stop.is_set():
        for sync in SYNCS:
            for connection_id in ACCOUNTS:
                stack.launch_poll(sync, connection_id)
        stop.wait(5.0)


def drain_free_for(store: Store, sync: str, connection_id: str, quiet_s: float, timeout_s: float) -> bool:
    """Wait until the partition's drain lease has been free for ``quiet_s``: no drainer stands."""
    deadline = time.monotonic() + timeout_s
    free_since: float | None = None
    while time.monotonic() < deadline:
        held = any(
            lease.role == "drain" and lease.connection_id == connection_id and lease.holder
            for lease in store.leases.list(sync)
        )
        now = time.monotonic()
        free_since = None if held else (free_since or now)
        if free_since is not None and now - free_since >= quiet_s:
            return True
        time.sleep(1.0)
    return False


def case_figures(case: str, latencies: list[float], expected: int, note: str) -> list[Figure]:
    p95_target, p99_target = TARGETS[case]
    label = f"{case}: {note}; {len(latencies)}/{expected} merged"
    if not latencies:
        return [figure(BENCHMARK, label, "merged", 0, "events", value_at_least=expected)]
    return [
        figure(BENCHMARK, label, "p50 accepted -> merged", percentile(latencies, 0.5), "s"),
        figure(BENCHMARK, label, "p95 accepted -> merged", percentile(latencies, 0.95), "s", value_at_most=p95_target),
        figure(BENCHMARK, label, "p99 accepted -> merged", percentile(latencies, 0.99), "s", value_at_most=p99_target),
        figure(BENCHMARK, label, "max accepted -> merged", max(latencies), "s"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    parser = benchmark_parser(__doc__)
    parser.add_argument("--changes", type=int, default=60, help="changes per traffic case")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between sandbox changes")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to let the first polls finish")
    parser.add_argument(
        "--quiet", type=float, default=10.0, help="cold case: seconds the partition's drain lease stays free first"
    )
    parser.add_argument(
        "--cold-rounds",
        type=int,
        default=3,
        help="cold case: samples per partition (each waits for the partition's drainer to end)",
    )
    parser.add_argument("--cases", default="steady,polled,cold")
    args = parser.parse_args(argv)
    changes = 20 if args.quick else args.changes
    args.cold_rounds = 1 if args.quick else args.cold_rounds
    cases = args.cases.split(",")
    figures: list[Figure] = []
    loads: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            print("starting make run's stack (sync-project dev) ...", file=sys.stderr, flush=True)
            stack.start()
            time.sleep(args.settle)
            store = Store(f"sqlite:///{stack.data / 'sync.db'}")
            with SandboxAdmin(f"http://127.0.0.1:{stack.sandbox}", stack.admin_token) as admin:
                # Warm-up: the partitions get their standing drainers (their first events are cold).
                start_id = store.inbox.high_water_mark()
                traffic(admin, len(ACCOUNTS) * len(SYNCS), 0.2)
                merged_latencies(store, start_id, len(ACCOUNTS) * len(SYNCS))
                if "steady" in cases:
                    start_id = store.inbox.high_water_mark()
                    traffic(admin, changes, args.interval)
                    loads.append(f"steady {load_average()}")
                    figures += case_figures(
                        "steady",
                        merged_latencies(store, start_id, changes),
                        changes,
                        f"1 change / {args.interval:g} s, 4 partitions",
                    )
                if "polled" in cases:
                    stop = threading.Event()
                    poller = threading.Thread(target=polling, args=(stack, stop), daemon=True)
                    poller.start()
                    time.sleep(15.0)  # the first polls are queued and starting
                    start_id = store.inbox.high_water_mark()
                    try:
                        traffic(admin, changes, args.interval)
                        loads.append(f"polled {load_average()}")
                    finally:
                        stop.set()
                        poller.join(240)
                    figures += case_figures(
                        "polled",
                        merged_latencies(store, start_id, changes),
                        changes,
                        "same traffic, full polls of all 4 partitions resubmitted as soon as submitted",
                    )
                if "cold" in cases:
                    cold: list[float] = []
                    samples = args.cold_rounds * len(ACCOUNTS) * len(SYNCS)
                    for round_ in range(args.cold_rounds):
                        for sync, share in SYNCS.items():
                            for connection_id, account in ACCOUNTS.items():
                                if not drain_free_for(store, sync, connection_id, args.quiet, LINGER_S + 180):
                                    print(
                                        f"{sync} {connection_id}: a drainer still stands; no cold sample",
                                        file=sys.stderr,
                                    )
                                    continue
                                start_id = store.inbox.high_water_mark()
                                admin.apply_changes(
                                    1, account_id=account, create=1, update=0, delete=0, deal_share=share
                                )
                                sample = merged_latencies(store, start_id, 1)
                                cold += sample
                                print(
                                    f"cold round {round_ + 1} {sync} {connection_id}: {sample}",
                                    file=sys.stderr,
                                    flush=True,
                                )
                    loads.append(f"cold {load_average()}")
                    figures += case_figures(
                        "cold",
                        cold,
                        samples,
                        f"first event after the drain lease was free {args.quiet:g} s, per partition, "
                        f"{args.cold_rounds} round(s)",
                    )
            store.close()
        finally:
            stack.stop()
    print(f"load average (1, 5, 15 min) at the end of each case: {'; '.join(loads)}")
    return publish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
