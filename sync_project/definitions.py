"""The code location: every declared sync, built into Dagster definitions.

``dagster dev -w workspace.yaml`` (or ``make run``) loads ``defs``.
"""

from sync_project import registry
from sync_project.analytics.deals_per_contact import deals_per_contact
from sync_project.orchestration.factory import build_definitions

defs = build_definitions(registry.syncs(), registry.providers(), extra_assets=[deals_per_contact])
