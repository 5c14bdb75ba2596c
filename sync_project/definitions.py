"""The code location: every declared sync, built into Dagster definitions.

Dagster loads the ``@dg.definitions`` function (``dagster dev -w workspace.yaml``, ``make run``,
``dagster asset materialize -m sync_project.definitions``, ``dg check defs``), so importing this
module builds nothing. In-process readers (the CLI, tests) use ``defs``: the same Definitions,
built on first use and kept for the process.
"""

from __future__ import annotations

import functools
from typing import Any

import dagster as dg

from sync_project import registry
from sync_project.analytics.deals_per_contact import deals_per_contact
from sync_project.orchestration.factory import build_definitions


@dg.definitions
def code_location() -> dg.Definitions:
    return _definitions()


@functools.cache
def _definitions() -> dg.Definitions:
    return build_definitions(registry.syncs(), registry.providers(), extra_assets=[deals_per_contact])


def __getattr__(name: str) -> Any:
    # A module attribute, not a module-level Definitions object: Dagster would find two
    # code locations here (the lazy one wins, but the module would build both at import).
    if name == "defs":
        return _definitions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
