"""Helpers shared by the benchmark scripts in this folder (run as files: ``python benchmarks/X.py``).

The JSON convention every benchmark script follows, so ``report.py`` can build one table:

* it accepts ``--json PATH`` and writes there a JSON list of :class:`Figure` objects
  (``benchmark, case, metric, value, unit, baseline, baseline_value, ratio, target, met``);
* it prints the same figures as a readable table on stdout;
* it accepts ``--quick`` (smaller sizes, named in each figure's ``case``) and its own size flags;
* it exits 0 whenever it ran: a missed target is a figure with ``met: false``, not a crash;
* it calls :func:`exit_cleanly_on_sigterm` first, so a timeout drops its private database.

Also here: a private Postgres database or schema per run (dropped afterwards), the fixed-seed
dataset of ~500-byte JSON records the merge benchmarks share, and a description of the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, TypeAdapter

#: The server the benchmarks use: the test server unless told otherwise.
POSTGRES_URL_ENV = "SYNC_BENCH_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

#: One seed for every dataset, so every run (and every benchmark) merges the same bytes.
SEED = 20240601
#: The issues' dataset: 200k records of about 500 bytes of JSON each.
DATASET_RECORDS = 200_000
#: The page size of the issues: the records of one poll page, one merge transaction.
PAGE_SIZE = 5_000


# -- figures ------------------------------------------------------------------------------------


class Figure(BaseModel):
    """One measured number, beside its baseline or peer when it has one."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    case: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    #: value / baseline_value, both measured in the same run.
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None


_FIGURES = TypeAdapter(list[Figure])


def figure(
    benchmark: str,
    case: str,
    metric: str,
    value: float,
    unit: str,
    *,
    baseline: str | None = None,
    baseline_value: float | None = None,
    ratio_at_least: float | None = None,
    ratio_at_most: float | None = None,
    value_at_least: float | None = None,
    value_at_most: float | None = None,
) -> Figure:
    """A figure whose ratio, target text and ``met`` are derived, so no script words them its own way.

    Ratio targets (``ratio_at_least=3`` reads ">= 3x <baseline>") need a baseline; value targets
    are absolute, in the figure's unit.
    """
    ratio = None
    if baseline_value is not None and baseline_value > 0:
        ratio = value / baseline_value
    targets: list[str] = []
    checks: list[bool] = []
    if ratio_at_least is not None or ratio_at_most is not None:
        if baseline is None or baseline_value is None:
            raise ValueError("a ratio target needs a baseline and its value")
        if ratio_at_least is not None:
            targets.append(f">= {ratio_at_least:g}x {baseline}")
            checks.append(ratio is not None and ratio >= ratio_at_least)
        if ratio_at_most is not None:
            targets.append(f"<= {ratio_at_most:g}x {baseline}")
            checks.append(ratio is not None and ratio <= ratio_at_most)
    if value_at_least is not None:
        targets.append(f">= {value_at_least:g} {unit}")
        checks.append(value >= value_at_least)
    if value_at_most is not None:
        targets.append(f"<= {value_at_most:g} {unit}")
        checks.append(value <= value_at_most)
    return Figure(
        benchmark=benchmark,
        case=case,
        metric=metric,
        value=value,
        unit=unit,
        baseline=baseline,
        baseline_value=baseline_value,
        ratio=ratio,
        target="; ".join(targets) or None,
        met=all(checks) if checks else None,
    )


def write_figures(path: str | Path, figures: Sequence[Figure]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(_FIGURES.dump_json(list(figures), indent=2).decode() + "\n")


def read_figures(path: str | Path) -> list[Figure]:
    """Figures from a script's ``--json`` file; raises ``pydantic.ValidationError`` on a bad one."""
    return _FIGURES.validate_json(Path(path).read_bytes())


def format_number(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def format_met(met: bool | None) -> str:
    return {None: "", True: "yes", False: "NO"}[met]


def figures_table(figures: Sequence[Figure]) -> str:
    """The figures as an aligned plain-text table, for stdout."""
    header = ("benchmark", "case", "metric", "value", "unit", "baseline", "baseline value", "ratio", "target", "met")
    rows = [
        (
            f.benchmark,
            f.case,
            f.metric,
            format_number(f.value),
            f.unit,
            f.baseline or "",
            format_number(f.baseline_value),
            format_ratio(f.ratio),
            f.target or "",
            format_met(f.met),
        )
        for f in figures
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def benchmark_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags every benchmark script shares; scripts add their own size flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", type=Path, help="write the figures there as a JSON list")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (named in each figure's case)")
    return parser


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``report.py``'s timeout, a CI stop) into SystemExit, so ``finally`` blocks run
    and the private database or schema is dropped instead of left on the server."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def publish(figures: Sequence[Figure], json_path: Path | None) -> int:
    """Print the figures, write them where ``--json`` asked; the exit code of a run that ran: 0."""
    print(figures_table(figures))
    if json_path is not None:
        write_figures(json_path, figures)
    return 0


class Stopwatch:
    """Wall-clock seconds of a block: ``with Stopwatch() as watch: ...; watch.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started


# -- a private Postgres -------------------------------------------------------------------------


def postgres_url() -> str:
    return os.environ.get(POSTGRES_URL_ENV) or os.environ.get("SYNC_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


@contextmanager
def private_postgres_database(prefix: str = "bench") -> Iterator[str]:
    """A fresh database on the benchmark server, dropped afterwards (even if the benchmark failed).

    A whole database rather than a schema, so tools that create schemas of their own (dlt creates
    its dataset and staging schemas) leave nothing behind.
    """
    base = sa.engine.make_url(postgres_url())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def private_postgres_schema(prefix: str = "bench") -> Iterator[str]:
    """A fresh schema on the benchmark server; the URL's connections see only it. Dropped afterwards."""
    base = postgres_url()
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        separator = "&" if "?" in base else "?"
        try:
            yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


# -- the dataset --------------------------------------------------------------------------------

_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Leslie"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Lamport"]
_CITIES = ["Berlin", "Lisbon", "Toronto", "Nairobi", "Osaka", "Lima", "Oslo", "Austin", "Pune", "Perth"]
_STAGES = ["subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead", "opportunity", "customer"]
_WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()

#: When the dataset's records were last modified at the provider; updates are later than this.
DATASET_EPOCH = datetime(2024, 6, 1, tzinfo=timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_record(index: int, rng: random.Random, updated_at: datetime) -> dict[str, Any]:
    """One CRM-contact-like record of about 500 bytes of JSON, keyed ``id``, stamped ``updated_at``."""
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    return {
        "id": f"contact-{index:07d}",
        "updated_at": _iso(updated_at),
        "email": f"{first}.{last}.{index}@example.com".lower(),
        "first_name": first,
        "last_name": last,
        "company": f"{rng.choice(_LAST)} {rng.choice(['Labs', 'Systems', 'GmbH', 'Inc', 'Partners'])}",
        "phone": f"+1-555-{rng.randrange(10**7):07d}",
        "lifecycle_stage": rng.choice(_STAGES),
        "owner_id": rng.randrange(1, 500),
        "score": round(rng.random() * 100, 2),
        "is_active": rng.random() < 0.9,
        "address": {
            "street": f"{rng.randrange(1, 999)} {rng.choice(_WORDS).title()} Street",
            "city": rng.choice(_CITIES),
            "postal_code": f"{rng.randrange(10**5):05d}",
        },
        "notes": " ".join(rng.choices(_WORDS, k=24)),
    }


def make_dataset(count: int = DATASET_RECORDS, *, seed: int = SEED) -> list[dict[str, Any]]:
    """``count`` records, the same ones on every run for a given seed."""
    rng = random.Random(seed)
    return [make_record(index, rng, DATASET_EPOCH - timedelta(seconds=count - index)) for index in range(count)]


def modified(record: dict[str, Any], rng: random.Random, updated_at: datetime) -> dict[str, Any]:
    """A newer version of ``record``: new provider timestamp, a few fields changed, same size."""
    changed = dict(record)
    changed["updated_at"] = _iso(updated_at)
    changed["lifecycle_stage"] = rng.choice(_STAGES)
    changed["score"] = round(rng.random() * 100, 2)
    changed["notes"] = " ".join(rng.choices(_WORDS, k=24))
    return changed


def sample_indexes(count: int, fraction: float, rng: random.Random, *, exclude: Collection[int] = ()) -> list[int]:
    """A fixed-seed sample of ``fraction`` of ``count`` indexes (none from ``exclude``), in index order."""
    excluded = set(exclude)
    pool = [index for index in range(count) if index not in excluded]
    return sorted(rng.sample(pool, round(count * fraction)))


def record_bytes(records: Sequence[dict[str, Any]]) -> float:
    """Mean size of the records as compact JSON, to show the dataset is what the issue says."""
    sample = records[: min(len(records), 1000)]
    return sum(len(json.dumps(r, separators=(",", ":"))) for r in sample) / max(len(sample), 1)


# -- the machine --------------------------------------------------------------------------------


def machine_description(database_url: str | None = None) -> dict[str, str]:
    """What the figures were measured on: CPU, cores, memory, OS, Python, Postgres, date."""
    description = {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "memory": _memory(),
        "OS": platform.platform(terse=True),
        "Python": platform.python_version(),
        "Postgres": _postgres_version(database_url or postgres_url()),
        # Other work on a shared machine moves absolute figures (ratios much less): say how busy it was.
        "load average at start (1/5/15 min)": _load_average(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def _load_average() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "?"


def _postgres_version(url: str) -> str:
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                return str(conn.execute(sa.text("SHOW server_version")).scalar_one())
        finally:
            engine.dispose()
    except Exception as error:  # noqa: BLE001 - the table says why instead of failing the report
        return f"unreachable ({type(error).__name__})"


# -- child processes ----------------------------------------------------------------------------


class ChildDiedError(RuntimeError):
    """A benchmark's child process exited before it answered: the benchmark stops, saying so."""


@dataclass(frozen=True)
class ChildFailure:
    """What a child put on its results queue instead of an answer: its traceback (see :class:`Reporting`)."""

    child: str
    traceback: str


@dataclass(frozen=True)
class Reporting:
    """A child's target that, when it raises, puts a :class:`ChildFailure` on ``results`` first.

    ``context.Process(target=Reporting(fn, results), args=...)``: the parent's
    :func:`get_from_child` then raises with the child's own traceback, not only its exit code.
    Picklable (a module-level class holding a module-level function), as ``spawn`` needs.
    """

    target: Callable[..., Any]
    results: Any

    def __call__(self, *args: Any) -> None:
        import multiprocessing
        import traceback

        try:
            self.target(*args)
        except BaseException:
            self.results.put(ChildFailure(multiprocessing.current_process().name, traceback.format_exc()))
            raise


def _answer(value: Any, what: str) -> Any:
    if isinstance(value, ChildFailure):
        raise ChildDiedError(f"{what}: child process {value.child} failed:\n{value.traceback}")
    return value


def get_from_child(results: Any, children: Sequence[Any], timeout_s: float, what: str) -> Any:
    """``results.get()``, but give up within about a second of any of ``children`` exiting.

    A child that dies (an exception, the OOM killer, "too many clients") puts nothing on the
    queue; waiting the whole timeout for it made a benchmark hang for an hour. The error names the
    child and its exit code, and carries its traceback when it ran under :class:`Reporting`.
    """
    import queue as queue_module

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _answer(results.get(timeout=0.5), what)
        except queue_module.Empty:
            pass
        for child in children:
            if not child.is_alive():
                try:  # it may have put its answer just before exiting
                    return _answer(results.get(timeout=0.5), what)
                except queue_module.Empty:
                    raise _died(child, what) from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")


def check_children(children: Sequence[Any], what: str, results: Any = None) -> None:
    """Raise :class:`ChildDiedError` if any of ``children`` has exited, with the failure it
    reported on ``results`` if it did. For waits that are not a read of that queue (a load phase)."""
    import queue as queue_module

    for child in children:
        if child.is_alive():
            continue
        if results is not None:
            with contextlib.suppress(queue_module.Empty):
                _answer(results.get(timeout=0.5), what)  # raises with its traceback if it reported one
        raise _died(child, what)


def _died(child: Any, what: str) -> ChildDiedError:
    return ChildDiedError(f"{what}: child process {child.name} exited with code {child.exitcode}")


async def watch_children(children: Sequence[Any], what: str, results: Any = None, every_s: float = 0.5) -> None:
    """Never returns: raises :class:`ChildDiedError` within ``every_s`` of a child's exit. Run it
    beside a load phase (``asyncio.wait(..., return_when=FIRST_COMPLETED)``) so a server that dies
    mid-phase ends the benchmark at once, not at the phase's time limit."""
    import asyncio

    while True:
        await asyncio.sleep(every_s)
        check_children(children, what, results)


# -- database connections -------------------------------------------------------------------------


def free_connections(url: str | None = None) -> int:
    """Connections the Postgres server can still open now (``max_connections`` less the reserved
    ones and those in use). The server is shared (tests, other benchmarks): a benchmark sizes its
    clients to fit instead of failing with "too many clients" half-way."""
    engine = sa.create_engine(url or postgres_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            limit = int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
            reserved = int(conn.execute(sa.text("SHOW superuser_reserved_connections")).scalar_one())
            used = int(conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity")).scalar_one())
    finally:
        engine.dispose()
    return max(0, limit - reserved - used)


def bounded_clients(wanted: int, url: str | None = None, *, keep_free: int = 20) -> int:
    """``wanted`` database clients, or fewer so that ``keep_free`` connections stay free for the
    rest of the machine (and the benchmark's own store); at least 1."""
    return max(1, min(wanted, free_connections(url) - keep_free))
