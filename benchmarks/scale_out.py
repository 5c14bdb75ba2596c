"""The same asset backfill on one Celery run worker host and on two, in one run.

What it measures: deploy/celery/ brought up as the scale-out test does (webserver, daemon and
receivers here; each worker in its own network namespace, reaching Postgres, RabbitMQ, Redis and
the sandbox over its veth link), then a full-refresh backfill of sandbox/contacts over every
partition, first with one worker host, then with two (a fresh deployment each). For each:

* wall time from the first run's start to the last run's end (the backfill daemon's first tick,
  up to 30 s, is not the workers' doing and is left out), and from launch to completion;
* runs per minute over the first; the ratio two workers / one;
* CPU seconds each worker host used during the backfill (all its processes, reaped children
  included, minus what they had used once ready).

On a 2-core machine the webserver, the daemon, Postgres, the sandbox and the workers share the
same two cores, so the ratio is bounded by CPU, not by the design: it is reported as measured.

    python benchmarks/scale_out.py [--partitions 12] [--records 2000] [--concurrency 2] [--quick] [--json PATH]

Needs root (network namespaces), RabbitMQ and Redis on loopback, and the celery extra.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import benchmark_parser, exit_cleanly_on_sigterm, figure, publish  # noqa: E402

BENCHMARK = "scale_out"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` and of their reaped children (fields 14-17 of /proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15])
    return total / CLOCK_TICKS


def run_backfill(workers: int, partitions: int, records: int, concurrency: int) -> dict[str, float]:
    import dagster as dg

    from sync_project_tests.support.scale_out import ScaleOutDeployment

    with tempfile.TemporaryDirectory(prefix="bench-scale-out-") as tmp:
        deployment = ScaleOutDeployment(
            Path(tmp), workers=workers, concurrency=concurrency, accounts=partitions, contacts=records
        )
        try:
            deployment.start()
            assert deployment.instance is not None
            baseline = {w.name: cpu_seconds(w.host.pids()) for w in deployment.worker_hosts}
            launched = time.time()
            backfill_id = deployment.launch_backfill(deployment.connection_ids, {})
            deadline = time.monotonic() + 1800
            while (status := deployment.backfill_status(backfill_id)) not in (
                "COMPLETED",
                "COMPLETED_SUCCESS",
                "COMPLETED_FAILED",
                "FAILED",
                "CANCELED",
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the backfill did not finish in 30 min: {status}")
                time.sleep(1)
            completed = time.time()
            if status not in ("COMPLETED", "COMPLETED_SUCCESS"):
                raise RuntimeError(f"the backfill ended {status}\n{deployment.tails()}")
            used = {w.name: cpu_seconds(w.host.pids()) - baseline[w.name] for w in deployment.worker_hosts}
            runs = deployment.instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
            starts = [r.start_time for r in runs if r.start_time is not None]
            ends = [r.end_time for r in runs if r.end_time is not None]
            per_worker: dict[str, int] = {}
            for record in runs:
                name = deployment.task_worker(record.dagster_run) or "?"
                per_worker[name] = per_worker.get(name, 0) + 1
            print(f"  {workers} worker(s): {len(runs)} runs, by worker {per_worker}, status {status}", flush=True)
            return {
                "runs": float(len(runs)),
                "execution_s": max(ends) - min(starts),
                "launch_to_done_s": completed - launched,
                **{f"cpu_{name}": seconds for name, seconds in used.items()},
            }
        finally:
            deployment.close()


def main() -> int:
    exit_cleanly_on_sigterm()
    parser = benchmark_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", type=int, default=12)
    parser.add_argument("--records", type=int, default=2000, help="contacts per partition")
    parser.add_argument("--concurrency", type=int, default=2, help="runs at once per worker host")
    args = parser.parse_args()
    partitions, records = (6, 200) if args.quick else (args.partitions, args.records)
    case = f"{partitions} partitions x {records} records, {args.concurrency} runs/worker"

    results = {workers: run_backfill(workers, partitions, records, args.concurrency) for workers in (1, 2)}
    figures = []
    for workers, result in results.items():
        label = f"{case}, {workers} worker host(s)"
        figures.append(
            figure(BENCHMARK, label, "wall time (first run start to last run end)", result["execution_s"], "s")
        )
        figures.append(
            figure(BENCHMARK, label, "wall time (launch to backfill completed)", result["launch_to_done_s"], "s")
        )
        figures.append(figure(BENCHMARK, label, "runs/min", result["runs"] / result["execution_s"] * 60, "runs/min"))
        for key, seconds in sorted(result.items()):
            if key.startswith("cpu_"):
                figures.append(figure(BENCHMARK, label, f"CPU of worker {key[4:]}", seconds, "s"))
    one, two = results[1], results[2]
    figures.append(
        figure(
            BENCHMARK,
            case,
            "runs/min, two worker hosts",
            two["runs"] / two["execution_s"] * 60,
            "runs/min",
            baseline="one worker host",
            baseline_value=one["runs"] / one["execution_s"] * 60,
        )
    )
    return publish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
