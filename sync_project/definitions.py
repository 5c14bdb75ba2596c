"""The code location: every declared sync, built into Dagster definitions.

Dagster loads the ``@dg.definitions`` function (``dagster dev -w workspace.yaml``, ``make run``,
``dagster asset materialize -m sync_project.definitions``, ``dg check defs``), so importing this
module builds nothing. In-process readers (the CLI, tests) use ``defs``: the same Definitions,
built on first use and kept for the process.
"""

from __future__ import annotations

import functools
import gc
from typing import Any

import dagster as dg

# Every run process imports this module, right after Dagster. Dagster's import leaves a large heap
# of objects that live as long as the process; each full collection the imports below trigger
# would walk all of it again (about 80 ms of a run's start). Frozen, the collector skips them.
gc.freeze()

from sync_project import registry  # noqa: E402 - after the freeze, on purpose
from sync_project.analytics.deals_per_contact import deals_per_contact  # noqa: E402
from sync_project.orchestration.factory import build_definitions  # noqa: E402


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
