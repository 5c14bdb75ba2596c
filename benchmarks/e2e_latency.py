"""End-to-end latency under ``make run``: from a webhook delivery accepted by the receiver to its
record merged into the store, p50 and p95.

It starts ``sync-project dev`` (sandbox, receiver, ``dagster dev`` with the project's dagster.yaml)
in a private data folder and Dagster home, lets it settle, then makes one sandbox change every
``--interval`` seconds. Each change is one webhook; its inbox row holds ``received_at`` (committed
before the receiver answered) and ``processed_at`` (committed in the same transaction as the merge),
so the difference is exactly "accepted -> merged". What bounds it: the sensor's 5 s tick floor, the
run queue's dequeue interval (1 s in dagster.yaml), and a run's start-up (a new process that imports
the code location), all of which are documented in ../shared/reference/dagster-1.13.md.

    python benchmarks/e2e_latency.py [--changes 40] [--interval 1.5] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sync_project.sandbox.client import SandboxAdmin  # noqa: E402
from sync_project.store import Store  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--interval", type=float, default=1.5, help="Seconds between sandbox changes.")
    parser.add_argument("--settle", type=float, default=20.0, help="Seconds to let the first polls finish.")
    parser.add_argument("--quick", action="store_true", help="20 changes.")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    changes = 20 if args.quick else args.changes
    with tempfile.TemporaryDirectory() as tmp:
        data, home = Path(tmp) / "data", Path(tmp) / "home"
        admin_token = "adm_" + secrets.token_urlsafe(16)
        env = {**os.environ, "SYNC_DATA_DIR": str(data), "DAGSTER_HOME": str(home), "SYNC_SANDBOX_ADMIN_TOKEN": admin_token}
        env.pop("SYNC_DATABASE_URL", None)
        ui, receiver, sandbox = free_port(), free_port(), free_port()
        dev = subprocess.Popen(
            [sys.executable, "-m", "sync_project.cli", "dev", "--ui-port", str(ui), "--receiver-port", str(receiver),
             "--sandbox-port", str(sandbox), "--change-rate", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
        try:
            print("starting make run's stack (sync-project dev) ...", file=sys.stderr, flush=True)
            for line in dev.stdout:
                if "Ctrl-C stops everything" in line:
                    break
            else:
                print("sync-project dev exited early", file=sys.stderr)
                return 1
            time.sleep(args.settle)
            store = Store(f"sqlite:///{data / 'sync.db'}")
            start_id = store.inbox.high_water_mark()
            with SandboxAdmin(f"http://127.0.0.1:{sandbox}", admin_token) as admin:
                for n in range(changes):
                    admin.apply_changes(1, account_id="acct-1" if n % 2 else "acct-2", create=1, update=3, delete=0)
                    print(f"\rchange {n + 1}/{changes}", end="", file=sys.stderr, flush=True)
                    time.sleep(args.interval)
            print(file=sys.stderr)
            deadline = time.monotonic() + 120
            while True:
                events = store.inbox.events(status="done", after_id=start_id, limit=10_000)
                if len(events) >= changes or time.monotonic() > deadline:
                    break
                time.sleep(1)
            store.close()
        finally:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(timeout=90)
            except subprocess.TimeoutExpired:
                dev.kill()
    latencies = [(e.processed_at - e.received_at).total_seconds() for e in events if e.processed_at]
    if len(latencies) < changes:
        print(f"only {len(latencies)} of {changes} deliveries were merged in time", file=sys.stderr)
        return 1
    p50, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    print(f"\nEnd to end under make run ({len(latencies)} webhooks, one every {args.interval} s)")
    print(f"  delivery accepted -> record merged: p50 {p50:.2f} s, p95 {p95:.2f} s, max {max(latencies):.2f} s")
    print(f"  targets: p50 <= 5 s ({'met' if p50 <= 5 else 'MISSED'}), p95 <= 8 s ({'met' if p95 <= 8 else 'MISSED'})")
    if args.json_path:
        rows = [
            {"benchmark": "e2e_latency", "case": "webhook accepted -> merged (make run)", "metric": name, "value": value,
             "unit": "s", "baseline": None, "baseline_value": None, "ratio": None, "target": target, "met": value <= bound}
            for name, value, target, bound in (("p50", p50, "<= 5 s", 5.0), ("p95", p95, "<= 8 s", 8.0))
        ]
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
