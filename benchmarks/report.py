"""Run every benchmark in this folder and regenerate the one table in benchmarks/README.md.

Each script listed in :data:`BENCHMARKS` that exists is run as ``python SCRIPT --json FILE [args]``
(the convention in ``_common.py``); an absent one is skipped with a note. Their figures, the
machine they ran on and how each script ended replace the text between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` in the README, so the table there is always
the output of the last run, never typed by hand.

``--only SCRIPT ...`` reruns some of them. Their rows are replaced; every other script's rows stay
as its last run wrote them, and the "Run at" column says when each script ran. Rows measured on
another machine (CPU or cores) or at other sizes (``--quick`` against full) are never mixed into
one table: such a rerun is refused before anything runs, and a full ``make bench`` starts afresh.
A script's figures name it (``benchmark`` is the script's stem): that is how its rows are found.

Exit status: 0 when every script that ran exited 0 with valid figures (missed targets are
figures, not failures), 1 otherwise, 2 when the README has no markers to write between or a
rerun would mix machines or sizes.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/report.py [--quick] [--only NAME ...]``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from _common import Figure, format_met, format_number, format_ratio, machine_description, read_figures
from pydantic import ValidationError

HERE = Path(__file__).resolve().parent
START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
#: Long enough for the issue's sizes on 2 cores; a hung script must not hang ``make bench``.
DEFAULT_TIMEOUT_S = 1200.0
STOP_GRACE_S = 30.0


@dataclass(frozen=True)
class Benchmark:
    """One script and the arguments ``make bench`` gives it."""

    script: str
    #: Arguments of the default run: the issue's sizes where they fit the time budget.
    args: tuple[str, ...] = ()
    #: Arguments of ``--quick``.
    quick_args: tuple[str, ...] = ("--quick",)


#: Every benchmark the table shows, in table order. Sizes are the issue's unless a script's
#: ``args`` say otherwise (and then its figures' ``case`` names the size).
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("merge.py"),
    Benchmark("dlt_merge.py"),
    Benchmark("receiver.py"),
    Benchmark("drain.py"),
    Benchmark("poll.py"),
    Benchmark("e2e_latency.py"),
    Benchmark("import_time.py"),
    # 1M records to fill and load take many minutes on 2 cores: the memory figure at 100k and 500k.
    Benchmark("warehouse.py", args=("--memory-sizes", "100000,500000")),
)


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str  # "ok", "failed", "absent"
    seconds: float = 0.0
    detail: str = ""
    figures: list[Figure] = field(default_factory=list)
    #: When the script started ("Run at" in the table).
    run_at: str = ""


def run_benchmark(
    benchmark: Benchmark, scripts_dir: Path, results_dir: Path, *, quick: bool, timeout: float
) -> Outcome:
    script = scripts_dir / benchmark.script
    if not script.exists():
        print(f"== {benchmark.script}: absent, skipped", flush=True)
        return Outcome(benchmark, "absent", detail="not in benchmarks/ yet")
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{script.stem}.json"
    json_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(script),
        "--json",
        str(json_path),
        *(benchmark.quick_args if quick else benchmark.args),
    ]
    print(f"== {benchmark.script}: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    # Output goes straight to ours: a long benchmark shows progress, and `make bench` keeps it.
    process = subprocess.Popen(command, cwd=scripts_dir.parent)
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        seconds = time.perf_counter() - started
        return Outcome(benchmark, "failed", seconds, f"killed after {timeout:.0f} s")
    seconds = time.perf_counter() - started
    if returncode != 0:
        return Outcome(benchmark, "failed", seconds, f"exit {returncode}")
    try:
        figures = read_figures(json_path)
    except FileNotFoundError:
        return Outcome(benchmark, "failed", seconds, "exit 0 but wrote no --json file")
    except (ValidationError, ValueError) as error:
        return Outcome(benchmark, "failed", seconds, f"invalid --json file: {_one_line(str(error))}")
    if not figures:
        return Outcome(benchmark, "failed", seconds, "exit 0 but reported no figures")
    strangers = sorted({f.benchmark for f in figures} - {script.stem})
    if strangers:
        return Outcome(benchmark, "failed", seconds, f"figures name {', '.join(strangers)}, not {script.stem}")
    return Outcome(benchmark, "ok", seconds, "exit 0", figures)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM first, so the script drops its private database on the way out; SIGKILL if it hangs."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sizes(quick: bool) -> str:
    return "--quick sizes" if quick else "full sizes"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _first_cell(row: str) -> str:
    return row[2:].split(" | ", 1)[0].replace("\\|", "|")


FIGURES_HEADER = "| Benchmark | Case | Metric | Value | Baseline / peer | Baseline value | Ratio | Target | Met |"
SCRIPTS_HEADER = "| Script | Result | Seconds | Run at |"


@dataclass(frozen=True)
class KeptRows:
    """What an earlier run wrote for the scripts a rerun leaves alone, read back from the table."""

    sizes: str | None = None
    machine: dict[str, str] = field(default_factory=dict)
    #: Figure rows by benchmark name (a script's stem), in table order.
    figures: dict[str, list[str]] = field(default_factory=dict)
    #: The script table's row by script name, with its "Run at" cell.
    scripts: dict[str, str] = field(default_factory=dict)


def read_section(text: str) -> KeptRows:
    """The rows of the table between the markers of README ``text`` (empty if there is none)."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        return KeptRows()
    sizes = None
    machine: dict[str, str] = {}
    figures: dict[str, list[str]] = {}
    scripts: dict[str, str] = {}
    table, dated = "", False
    for line in text[start + len(START_MARKER) : end].splitlines():
        if line.startswith("Generated by"):
            sizes = next((size for size in (_sizes(True), _sizes(False)) if f"({size}" in line), None)
        if not line.startswith("| "):
            table = ""
            continue
        if not table:  # a table's header row
            table, dated = _first_cell(line), "| Run at |" in line
            continue
        if line.startswith("| ---"):
            continue
        name = _first_cell(line)
        if table == "Machine":
            machine[name] = line[2:-2].split(" | ", 1)[-1]
        elif table == "Benchmark":
            figures.setdefault(name, []).append(line)
        elif table == "Script":
            # Tables written before "Run at" existed: their scripts ran when the machine's date says.
            scripts[name] = line if dated else f"{line} {machine.get('date', '')} |"
    return KeptRows(sizes, machine, figures, scripts)


def mixing_problem(kept: KeptRows, machine: dict[str, str], *, quick: bool) -> str | None:
    """Why rows kept from ``kept`` cannot share a table with a rerun on ``machine``; None if they can."""
    if kept.sizes is not None and kept.sizes != _sizes(quick):
        return f"the table's other rows were measured at {kept.sizes}, this run would use {_sizes(quick)}"
    for name in ("CPU", "cores"):
        if name in kept.machine and kept.machine[name] != machine.get(name):
            return f"the table's other rows were measured on {name} {kept.machine[name]!r}, this machine has {machine.get(name)!r}"
    return None


def render_section(
    outcomes: Sequence[Outcome],
    machine: dict[str, str],
    *,
    quick: bool,
    total_seconds: float,
    kept: KeptRows | None = None,
    order: Sequence[Benchmark] = (),
) -> str:
    """The Markdown that goes between the markers: the outcomes' rows, and ``kept``'s rows for every
    script of ``order`` that did not run this time, all in ``order``."""
    ran = {outcome.benchmark.script: outcome for outcome in outcomes}
    scripts = [b.script for b in order] or list(ran)
    scripts += [name for name in ran if name not in scripts]
    kept = kept or KeptRows()
    if kept.scripts or kept.figures:
        what = f"{', '.join(ran)} rerun with `report.py --only` in {total_seconds:.0f} s"
        headline = f"Generated by `make bench` ({_sizes(quick)}); {what}, the other rows kept from their last run."
    else:
        headline = f"Generated by `make bench` ({_sizes(quick)}) in {total_seconds:.0f} s."
    lines = [
        "",
        headline,
        "",
        "| Machine | |",
        "| --- | --- |",
        *(f"| {_cell(name)} | {_cell(value)} |" for name, value in machine.items()),
        "",
        FIGURES_HEADER,
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for script in scripts:
        outcome = ran.get(script)
        if outcome is None:
            lines += kept.figures.get(Path(script).stem, [])
            continue
        for f in outcome.figures:
            baseline_value = f"{format_number(f.baseline_value)} {f.unit}" if f.baseline_value is not None else ""
            lines.append(
                "| "
                + " | ".join(
                    _cell(cell)
                    for cell in (
                        f.benchmark,
                        f.case,
                        f.metric,
                        f"{format_number(f.value)} {f.unit}",
                        f.baseline or "",
                        baseline_value,
                        format_ratio(f.ratio),
                        f.target or "",
                        format_met(f.met),
                    )
                )
                + " |"
            )
    lines += ["", SCRIPTS_HEADER, "| --- | --- | ---: | --- |"]
    for script in scripts:
        outcome = ran.get(script)
        if outcome is None:
            lines.append(kept.scripts.get(script, f"| {_cell(script)} | not run | | |"))
            continue
        result = {"ok": "ran", "failed": "FAILED", "absent": "absent"}[outcome.status]
        if outcome.detail:
            result += f": {outcome.detail}"
        seconds = f"{outcome.seconds:.0f}" if outcome.status != "absent" else ""
        lines.append(f"| {_cell(script)} | {_cell(result)} | {seconds} | {outcome.run_at} |")
    lines.append("")
    return "\n".join(lines)


class MissingMarkersError(ValueError):
    pass


def replace_section(text: str, section: str) -> str:
    """``text`` with everything between the markers replaced by ``section``; the rest untouched."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise MissingMarkersError(f"the README needs {START_MARKER} followed by {END_MARKER} on lines of their own")
    return text[: start + len(START_MARKER)] + "\n" + section.strip("\n") + "\n" + text[end:]


def report(
    benchmarks: Sequence[Benchmark],
    *,
    only: Collection[str] | None = None,
    scripts_dir: Path = HERE,
    readme: Path = HERE / "README.md",
    results_dir: Path = HERE / ".results",
    quick: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    machine: dict[str, str] | None = None,
) -> int:
    """Run ``benchmarks`` (only the scripts named in ``only``, if given, keeping the others' rows),
    rewrite the README's table; the exit status for ``make bench``."""
    text = readme.read_text() if readme.exists() else ""
    try:
        replace_section(text, "")  # fail before spending minutes on benchmarks
    except MissingMarkersError as error:
        print(f"report: {readme}: {error}", file=sys.stderr)
        return 2
    machine = machine or machine_description()  # before the run: its date and load are the run's
    to_run = [b for b in benchmarks if only is None or b.script in only]
    kept = None
    if len(to_run) < len(benchmarks):
        kept = read_section(text)
        problem = mixing_problem(kept, machine, quick=quick)
        if problem:
            print(
                f"report: {readme}: not rerunning only {', '.join(b.script for b in to_run)}: {problem}; "
                "run them all (make bench)",
                file=sys.stderr,
            )
            return 2
    started = time.perf_counter()
    outcomes = []
    for benchmark in to_run:
        run_at = _now()
        outcome = run_benchmark(benchmark, scripts_dir, results_dir, quick=quick, timeout=timeout)
        outcomes.append(replace(outcome, run_at=run_at))
    total = time.perf_counter() - started
    section = render_section(outcomes, machine, quick=quick, total_seconds=total, kept=kept, order=benchmarks)
    readme.write_text(replace_section(text, section))
    print(f"\nreport: wrote the table to {readme}")
    for outcome in outcomes:
        print(f"  {outcome.benchmark.script}: {outcome.status} {outcome.detail}".rstrip())
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass each script its --quick sizes")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCRIPT",
        help="rerun only these scripts (e.g. dlt_merge.py), keeping the others' rows",
    )
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per script")
    args = parser.parse_args(argv)
    if args.only:
        known = {b.script for b in BENCHMARKS}
        unknown = [name for name in args.only if name not in known]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return report(BENCHMARKS, only=args.only, readme=args.readme, quick=args.quick, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
