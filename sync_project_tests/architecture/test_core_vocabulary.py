"""``sync_project.core`` is the vocabulary syncs are written against: importable alone and light.

A sync module's process (a run worker, the receiver) imports the vocabulary first; pulling the
store's database stack or pandas in with it would cost every one of them seconds and tie the
declarations to the database layer they are meant not to know.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import sync_project.core as core

#: httpx too (and idna, rich, which it pulls in): it is imported when a client is built.
HEAVY = ("pandas", "sqlalchemy", "alembic", "dagster", "httpx", "idna", "rich")


def test_importing_core_loads_neither_the_store_nor_its_database_stack() -> None:
    probe = (
        "import json, sys\n"
        "import sync_project.core\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "ours = sorted(m for m in sys.modules if m.startswith('sync_project.') and not m.startswith('sync_project.core'))\n"
        "print(json.dumps({'heavy': heavy, 'ours': ours}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"heavy": [], "ours": []}


def test_every_sync_module_takes_its_vocabulary_from_the_core_package() -> None:
    """Sync modules import ``sync_project.core`` (its public names), never its submodules, the store
    or the orchestration: the declared surface is all a sync author needs."""
    syncs = Path(core.__file__).parent.parent / "syncs"
    offenders = []
    for module in sorted(syncs.glob("*.py")):
        for line in module.read_text().splitlines():
            if line.startswith(("from sync_project", "import sync_project")):
                imported = line.split()[1]
                if line == "from sync_project import core":
                    continue
                if imported != "sync_project.core" and not imported.startswith("sync_project.providers"):
                    offenders.append(f"{module.name}: {line}")
    assert offenders == []


def test_the_public_names_exist() -> None:
    missing = [name for name in core.__all__ if not hasattr(core, name)]
    assert missing == []
