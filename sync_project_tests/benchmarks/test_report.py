"""The benchmark harness: figures, the README table, and what `make bench` exits with.

The scripts it runs here are tiny real Python files in a temporary folder, run as subprocesses
exactly as report.py runs the real benchmarks; no timing is asserted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import _common
import pytest
import report
from pydantic import ValidationError

MACHINE = {"CPU": "test CPU", "cores": "2"}
README = f"# Benchmarks\n\nHand-written text.\n\n{report.START_MARKER}\nold table\n{report.END_MARKER}\n\nFooter.\n"

#: A benchmark named after its script, as report.py requires (``fake.py`` reports ``fake``).
WRITES_FIGURE = """
import json, pathlib, sys
path = sys.argv[sys.argv.index("--json") + 1]
value = float(sys.argv[sys.argv.index("--value") + 1]) if "--value" in sys.argv else 2500.0
figure = {"benchmark": pathlib.Path(sys.argv[0]).stem, "case": "size " + ("small" if "--quick" in sys.argv else "full"),
          "metric": "speed", "value": value, "unit": "records/s", "baseline": "peer",
          "baseline_value": 1000.0, "ratio": 2.5, "target": ">= 3x peer", "met": False}
json.dump([figure], open(path, "w"))
print("fake ran")
"""


def _script(folder: Path, name: str, body: str) -> report.Benchmark:
    (folder / name).write_text(body)
    return report.Benchmark(name)


def _readme(tmp_path: Path, text: str = README) -> Path:
    path = tmp_path / "README.md"
    path.write_text(text)
    return path


def _report(tmp_path: Path, benchmarks: list[report.Benchmark], readme: Path, **kwargs: object) -> int:
    return report.report(
        benchmarks,
        scripts_dir=tmp_path,
        readme=readme,
        results_dir=tmp_path / ".results",
        machine=MACHINE,
        **kwargs,  # type: ignore[arg-type]
    )


def test_figure_derives_ratio_target_and_met() -> None:
    met = _common.figure("b", "c", "m", 300.0, "records/s", baseline="peer", baseline_value=100.0, ratio_at_least=3)
    missed = _common.figure("b", "c", "m", 290.0, "records/s", baseline="peer", baseline_value=100.0, ratio_at_least=3)
    assert (met.ratio, met.target, met.met) == (3.0, ">= 3x peer", True)
    assert (missed.ratio, missed.met) == (2.9, False)


def test_figure_without_target_has_no_verdict() -> None:
    plain = _common.figure("b", "c", "m", 5.0, "s", baseline="peer", baseline_value=10.0)
    assert (plain.ratio, plain.target, plain.met) == (0.5, None, None)


def test_figure_absolute_targets_combine() -> None:
    latency = _common.figure("b", "c", "p95", 9.0, "s", value_at_most=8)
    assert (latency.target, latency.met) == ("<= 8 s", False)


def test_ratio_target_without_a_baseline_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a baseline"):
        _common.figure("b", "c", "m", 1.0, "x", ratio_at_least=2)


def test_figures_round_trip_through_json(tmp_path: Path) -> None:
    figures = [_common.figure("b", "c", "m", 1.5, "x", baseline="peer", baseline_value=3.0, ratio_at_most=1)]
    _common.write_figures(tmp_path / "f.json", figures)
    assert _common.read_figures(tmp_path / "f.json") == figures


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '[{"benchmark": "b"}]',  # fields missing
        '[{"benchmark": "b", "case": "c", "metric": "m", "value": "fast", "unit": "x"}]',
        '[{"benchmark": "b", "case": "c", "metric": "m", "value": 1, "unit": "x", "colour": "red"}]',
    ],
)
def test_a_bad_figures_file_is_rejected(tmp_path: Path, content: str) -> None:
    (tmp_path / "f.json").write_text(content)
    with pytest.raises(ValidationError):
        _common.read_figures(tmp_path / "f.json")


def test_replace_section_keeps_everything_outside_the_markers() -> None:
    replaced = report.replace_section(README, "new table")
    assert "old table" not in replaced
    assert replaced.startswith("# Benchmarks\n\nHand-written text.\n\n")
    assert f"{report.START_MARKER}\nnew table\n{report.END_MARKER}\n\nFooter.\n" in replaced
    assert report.replace_section(replaced, "newer") == report.replace_section(README, "newer")


@pytest.mark.parametrize("text", ["no markers", f"{report.END_MARKER}\n{report.START_MARKER}", report.START_MARKER])
def test_replace_section_without_markers_is_an_error(text: str) -> None:
    with pytest.raises(report.MissingMarkersError):
        report.replace_section(text, "table")


def test_report_writes_figures_machine_and_absent_scripts(tmp_path: Path) -> None:
    ok = _script(tmp_path, "fake.py", WRITES_FIGURE)
    readme = _readme(tmp_path)
    status = _report(tmp_path, [ok, report.Benchmark("not_written_yet.py")], readme)
    text = readme.read_text()
    assert status == 0
    assert "| test CPU |" in text
    assert "| fake | size full | speed | 2,500 records/s | peer | 1,000 records/s | 2.50x | >= 3x peer | NO |" in text
    assert "| not_written_yet.py | absent: not in benchmarks/ yet |" in text
    assert "old table" not in text and text.endswith("Footer.\n")


def test_report_quick_passes_the_quick_arguments(tmp_path: Path) -> None:
    ok = _script(tmp_path, "fake.py", WRITES_FIGURE)
    readme = _readme(tmp_path)
    assert _report(tmp_path, [ok], readme, quick=True) == 0
    assert "| fake | size small |" in readme.read_text()
    assert "--quick sizes" in readme.read_text()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("import sys; sys.exit(3)", "exit 3"),
        ("print('forgot the json')", "wrote no --json file"),
        (
            "import sys; open(sys.argv[sys.argv.index('--json') + 1], 'w').write('[{\"value\": 1}]')",
            "invalid --json file",
        ),
        ("import sys; open(sys.argv[sys.argv.index('--json') + 1], 'w').write('[]')", "reported no figures"),
    ],
)
def test_a_failed_script_fails_the_report_and_is_shown(tmp_path: Path, body: str, reason: str) -> None:
    ok = _script(tmp_path, "fake.py", WRITES_FIGURE)
    bad = _script(tmp_path, "bad.py", body)
    readme = _readme(tmp_path)
    status = _report(tmp_path, [ok, bad], readme)
    text = readme.read_text()
    assert status == 1
    assert "| bad.py | FAILED: " in text and reason in text
    assert "| fake | size full |" in text  # the scripts that ran still have their figures


def test_figures_that_name_another_benchmark_fail_the_script(tmp_path: Path) -> None:
    # Its rows could not be found again by a later --only rerun, so they are refused at once.
    misnamed = _script(tmp_path, "misnamed.py", WRITES_FIGURE.replace("pathlib.Path(sys.argv[0]).stem", "'other'"))
    readme = _readme(tmp_path)
    assert _report(tmp_path, [misnamed], readme) == 1
    assert "| misnamed.py | FAILED: figures name other, not misnamed |" in readme.read_text()


def _two_scripts(tmp_path: Path) -> list[report.Benchmark]:
    first = _script(tmp_path, "first.py", WRITES_FIGURE)
    second = _script(tmp_path, "second.py", WRITES_FIGURE)
    return [
        report.Benchmark(first.script, args=("--value", "100")),
        report.Benchmark(second.script, args=("--value", "200")),
    ]


def _figure_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("| first |", "| second |"))]


def test_only_reruns_its_scripts_and_keeps_the_other_rows_in_table_order(tmp_path: Path) -> None:
    first, second = _two_scripts(tmp_path)
    readme = _readme(tmp_path)
    assert _report(tmp_path, [first, second], readme) == 0
    before = readme.read_text()
    assert [row.split(" | ")[3] for row in _figure_rows(before)] == ["100.0 records/s", "200.0 records/s"]

    rerun = report.Benchmark(first.script, args=("--value", "150"))
    assert _report(tmp_path, [rerun, second], readme, only=["first.py"]) == 0
    after = readme.read_text()
    assert [row.split(" | ")[3] for row in _figure_rows(after)] == ["150.0 records/s", "200.0 records/s"]
    assert "first.py rerun with `report.py --only`" in after and "(full sizes)" in after
    scripts = [line for line in after.splitlines() if line.startswith(("| first.py |", "| second.py |"))]
    kept_row = next(line for line in before.splitlines() if line.startswith("| second.py |"))
    assert scripts[0].startswith("| first.py | ran: exit 0 |") and scripts[1] == kept_row
    assert after.endswith("Footer.\n") and "Hand-written text." in after

    # Kept rows survive a second partial rerun, of the other script, too.
    assert (
        _report(tmp_path, [rerun, report.Benchmark(second.script, args=("--value", "250"))], readme, only=["second.py"])
        == 0
    )
    assert [row.split(" | ")[3] for row in _figure_rows(readme.read_text())] == ["150.0 records/s", "250.0 records/s"]


def test_only_on_a_table_written_before_run_at_dates_the_kept_rows_by_its_machine(tmp_path: Path) -> None:
    first, second = _two_scripts(tmp_path)
    old = (
        f"{report.START_MARKER}\nGenerated by `make bench` (full sizes) in 9 s.\n\n| Machine | |\n| --- | --- |\n"
        "| CPU | test CPU |\n| cores | 2 |\n| date | 2026-01-01 10:00 UTC |\n\n"
        f"{report.FIGURES_HEADER}\n| --- | --- | --- | ---: | --- | ---: | ---: | --- | --- |\n"
        "| second | size full | speed | 7 records/s | | | | | |\n\n"
        f"| Script | Result | Seconds |\n| --- | --- | ---: |\n| second.py | ran: exit 0 | 9 |\n{report.END_MARKER}\n"
    )
    readme = _readme(tmp_path, old)
    assert _report(tmp_path, [first, second], readme, only=["first.py"]) == 0
    text = readme.read_text()
    assert "| second | size full | speed | 7 records/s | | | | | |" in text
    assert "| second.py | ran: exit 0 | 9 | 2026-01-01 10:00 UTC |" in text
    assert text.index("| first | size full |") < text.index("| second | size full |")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"quick": True}, "measured at full sizes, this run would use --quick sizes"),
        ({"machine": {**MACHINE, "CPU": "another CPU"}}, "measured on CPU 'test CPU', this machine has 'another CPU'"),
        ({"machine": {**MACHINE, "cores": "8"}}, "measured on cores '2', this machine has '8'"),
    ],
)
def test_only_refuses_to_mix_rows_of_other_sizes_or_machines(
    tmp_path: Path, change: dict[str, object], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _two_scripts(tmp_path)
    readme = _readme(tmp_path)
    assert _report(tmp_path, [first, second], readme) == 0
    before = readme.read_text()
    ran = tmp_path / "ran"
    marking = report.Benchmark(_script(tmp_path, "first.py", f"open({str(ran)!r}, 'w').close()").script)
    kwargs: dict[str, object] = {"machine": MACHINE, **change}
    status = report.report(
        [marking, second],
        only=["first.py"],
        scripts_dir=tmp_path,
        readme=readme,
        results_dir=tmp_path / ".results",
        **kwargs,  # type: ignore[arg-type]
    )
    assert status == 2
    assert reason in capsys.readouterr().err
    assert not ran.exists() and readme.read_text() == before


def test_a_hung_script_is_killed_and_fails_the_report(tmp_path: Path) -> None:
    hung = _script(tmp_path, "hung.py", "import time; time.sleep(60)")
    readme = _readme(tmp_path)
    assert _report(tmp_path, [hung], readme, timeout=1.0) == 1
    assert "| hung.py | FAILED: killed after 1 s |" in readme.read_text()


def test_a_readme_without_markers_fails_before_running_anything(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = _script(tmp_path, "ok.py", f"open({str(marker)!r}, 'w').close()")
    readme = _readme(tmp_path, "# no markers here\n")
    assert _report(tmp_path, [script], readme) == 2
    assert not marker.exists()
    assert readme.read_text() == "# no markers here\n"


def test_every_listed_benchmark_has_a_distinct_script() -> None:
    names = [b.script for b in report.BENCHMARKS]
    assert len(names) == len(set(names))
    assert "dlt_merge.py" in names and all(name.endswith(".py") for name in names)


def test_unknown_only_name_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--only", "nope.py"])
    assert exit_info.value.code == 2
    assert "unknown benchmark(s) nope.py" in capsys.readouterr().err


def test_machine_description_names_what_the_table_needs() -> None:
    described = _common.machine_description("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    assert {"CPU", "cores", "memory", "OS", "Python", "Postgres", "date"} <= set(described)
    assert described["Postgres"].startswith("unreachable")


def test_the_fixed_seed_dataset_is_stable_and_about_500_bytes() -> None:
    first, second = _common.make_dataset(300), _common.make_dataset(300)
    assert first == second
    assert len({r["id"] for r in first}) == 300
    assert 400 <= _common.record_bytes(first) <= 600
    assert json.dumps(first) != json.dumps(_common.make_dataset(300, seed=1))


def test_stopping_a_script_sends_sigterm_first_so_it_can_clean_up(tmp_path: Path) -> None:
    ready, cleaned = tmp_path / "ready", tmp_path / "dropped-its-database"
    body = f"""
import sys, time
sys.path.insert(0, {str(report.HERE)!r})
import _common
_common.exit_cleanly_on_sigterm()
open({str(ready)!r}, "w").close()
try:
    time.sleep(60)
finally:
    open({str(cleaned)!r}, "w").close()
"""
    (tmp_path / "slow.py").write_text(body)
    process = subprocess.Popen([sys.executable, str(tmp_path / "slow.py")])
    try:
        for _ in range(600):  # the handler is installed once "ready" exists
            if ready.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists()
        report._stop(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM
    assert cleaned.exists()
