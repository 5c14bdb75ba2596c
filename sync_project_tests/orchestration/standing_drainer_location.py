"""The code location ``test_standing_drainers.py`` starts under a real ``dagster-daemon``.

The project's sandbox contacts sync as :mod:`sync_project.definitions` builds it, with limits of
seconds instead of minutes (a drainer's cap 24 s, its successor requested 12 s before it) so a
handoff happens within the test, and a poll that takes ``POLL_DELAY_S`` before its first page, so
polls of the partitions are in progress while their webhooks flow. Webhook runs linger 60 s, as
standing drainers do in production (there: 5 min). Everything else is what production runs.
"""

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

from sync_project import registry
from sync_project.core import FetchContext, Page
from sync_project.orchestration.factory import build_definitions
from sync_project.orchestration.run_limits import RunLimits

POLL_DELAY_S = 60.0
RUN_LIMITS = RunLimits(
    webhook_linger_cap=timedelta(seconds=24),
    webhook_margin=timedelta(seconds=40),
    handoff_lead=timedelta(seconds=12),
    # The standby lives the whole test (its successor is the production path, tested in-process).
    standby_cap=timedelta(minutes=10),
)

_contacts = next(sync for sync in registry.syncs() if sync.key == "sandbox/contacts")
_fetch = _contacts.fetch


def _slow_fetch(ctx: FetchContext) -> Iterator[Page]:
    time.sleep(POLL_DELAY_S)
    yield from _fetch(ctx)


defs = build_definitions(
    [replace(_contacts, fetch=_slow_fetch)],
    registry.providers(),
    webhook_linger_s=60.0,
    run_limits=RUN_LIMITS,
)
