"""The code location ``test_killed_run.py`` starts under a real ``dagster-daemon``.

The project's sandbox contacts sync, as :mod:`sync_project.definitions` builds it, with two
changes a test needs: its webhook handler takes ``HANDLER_DELAY_S`` per event (so a batch stays
open long enough to kill its run in the middle of it), and its webhook runs get time limits of
seconds instead of minutes (so the bound is reached within the test). Everything else, the
sensor, the run queue, run monitoring, is what production runs.
"""

import time
from dataclasses import replace
from datetime import timedelta

from sync_project import registry
from sync_project.core import InboundEvent, WebhookChange, WebhookContext
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.run_limits import RunLimits

HANDLER_DELAY_S = 0.25
#: Webhook runs stop claiming after 5 s; run monitoring fails one after 45 s, which leaves a run
#: the 35 s it may wait for a dead drainer's lease to expire.
RUN_LIMITS = RunLimits(
    webhook_linger_cap=timedelta(seconds=5), webhook_margin=timedelta(seconds=40), handoff_lead=timedelta(seconds=2)
)

_contacts = next(sync for sync in registry.syncs() if sync.key == "sandbox/contacts")
assert _contacts.on_webhook is not None
_handler = _contacts.on_webhook


def _slow_on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    time.sleep(HANDLER_DELAY_S)
    return list(_handler(ctx, event) or [])


defs = build_definitions(
    [replace(_contacts, on_webhook=_slow_on_webhook)],
    registry.providers(),
    webhook_linger_s=0.0,
    run_limits=RUN_LIMITS,
)
