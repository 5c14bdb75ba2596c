"""CPU a run process spends importing the code location: ``import sync_project.definitions``.

Every run Dagster launches is a fresh process that imports the code location before its first
step, so this is paid by every webhook run that is not already up. Each figure is the median of
fresh interpreters (``getrusage`` user + system CPU of the child), beside the floor that cannot be
removed from the project's side: ``import dagster`` alone. The breakdown (``-X importtime``,
cumulative, top-level packages) says where the rest goes.
"""

from __future__ import annotations

import compileall
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from _common import benchmark_parser, exit_cleanly_on_sigterm, figure, publish

import sync_project

BENCHMARK = "import_time"
TARGET_CPU_S = 1.0
_CPU = (
    "import resource, sys\n"
    "import {module}\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(usage.ru_utime + usage.ru_stime)\n"
)


def cpu_seconds(module: str) -> float:
    output = subprocess.run(
        [sys.executable, "-c", _CPU.format(module=module)], check=True, capture_output=True, text=True, timeout=120
    )
    return float(output.stdout.strip().splitlines()[-1])


def breakdown(module: str, top: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import time (wall, so only the proportions matter)."""
    output = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    packages: dict[str, float] = {}
    for line in output.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)", line)
        if match and "." not in match.group(2):
            name, cumulative = match.group(2), int(match.group(1)) / 1e6
            packages[name] = max(packages.get(name, 0.0), cumulative)
    return sorted(packages.items(), key=lambda item: -item[1])[:top]


def main(argv: Sequence[str] | None = None) -> int:
    exit_cleanly_on_sigterm()
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="fresh interpreters per figure (median)")
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat
    # As `make run` leaves the project (its bytecode compiled), so a machine that sets
    # PYTHONDONTWRITEBYTECODE does not measure compiling the project's source in every interpreter.
    compileall.compile_dir(str(Path(sync_project.__file__).parent), quiet=1)
    # Alternated, so a change in the machine's speed during the run moves both medians alike.
    projects, floors = [], []
    for _ in range(repeat):
        projects.append(cpu_seconds("sync_project.definitions"))
        floors.append(cpu_seconds("dagster"))
    project, floor = statistics.median(projects), statistics.median(floors)
    case = f"median of {repeat} fresh interpreters"
    figures = [
        figure(
            BENCHMARK,
            case,
            "import sync_project.definitions, CPU",
            project,
            "s",
            baseline="import dagster",
            baseline_value=floor,
            value_at_most=TARGET_CPU_S,
        ),
        figure(BENCHMARK, case, "import dagster alone, CPU (the floor)", floor, "s"),
        figure(BENCHMARK, case, "the project's share beyond dagster, CPU", max(0.0, project - floor), "s"),
    ]
    print("import time by top-level package (cumulative wall, one interpreter):")
    for name, seconds in breakdown("sync_project.definitions"):
        print(f"  {name:<40} {seconds:6.3f} s")
    return publish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
