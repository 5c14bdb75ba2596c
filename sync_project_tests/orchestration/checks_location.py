"""The code location of ``test_checks.py``'s UI queries: the fake API's items sync, with webhooks.

The GraphQL the UI sends reads the asset's check specs from a code location and the results from
the instance, so the test loads this module in-process as the webserver would from a code server.
"""

from dataclasses import replace

from sync_project.core import Save
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.notifications import NotifierResource
from sync_project_tests.orchestration.fake_api import ITEMS, PROVIDER

SYNC = replace(
    ITEMS,
    webhook_events=("item.updated",),
    on_webhook=lambda ctx, event: [Save(event.payload)],
)

defs = build_definitions([SYNC], {"fakeapi": PROVIDER}, notifier=NotifierResource())
