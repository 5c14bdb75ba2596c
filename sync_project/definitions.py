"""The code location: every declared sync, built into Dagster definitions.

``dagster dev -m sync_project.definitions`` (or ``make run``) loads ``defs``.
"""

from sync_project import registry
from sync_project.orchestration.factory import build_definitions

defs = build_definitions(registry.syncs(), registry.providers())
