"""The layer contracts in pyproject.toml hold, and break when a layer reaches up.

``make lint`` runs ``lint-imports`` over the package; these tests run it over a copy of the
package so that a planted violation never touches the working tree other tests import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import sync_project

PROJECT = Path(sync_project.__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_of_the_package(tmp_path: Path) -> Path:
    shutil.copytree(
        PROJECT / "sync_project",
        tmp_path / "sync_project",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.sql", "*.yaml", "*.md"),
    )
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # The copy comes first on the path, so grimp builds the graph of the copy, not of the checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_package_keeps_its_layer_contracts(tmp_path: Path) -> None:
    result = _lint_imports(_copy_of_the_package(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_core_importing_orchestration_fails_the_gate(tmp_path: Path) -> None:
    root = _copy_of_the_package(tmp_path)
    (root / "sync_project" / "core" / "planted.py").write_text(
        '"""A planted violation: the vocabulary reaching up into the Dagster machinery."""\n\n'
        "from sync_project.orchestration import factory\n\n"
        "__all__ = ['factory']\n"
    )
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "core is the vocabulary" in result.stdout and "BROKEN" in result.stdout
    assert "sync_project.core.planted -> sync_project.orchestration" in result.stdout


def test_reaching_into_a_store_module_fails_the_gate(tmp_path: Path) -> None:
    root = _copy_of_the_package(tmp_path)
    (root / "sync_project" / "receiver" / "planted.py").write_text(
        '"""A planted violation: the receiver reaching past the store\'s surface into its inbox module."""\n\n'
        "from sync_project.store import Store\n"
        "from sync_project.store.inbox import insert_events\n\n"
        "__all__ = ['Store', 'insert_events']\n"
    )
    result = _lint_imports(root)
    assert result.returncode != 0
    assert "The store is one surface" in result.stdout and "BROKEN" in result.stdout
    assert "sync_project.receiver.planted -> sync_project.store.inbox" in result.stdout
    # Only the planted module broke it: the surface itself is fine to import.
    assert "sync_project.receiver.planted -> sync_project.store\n" not in result.stdout
