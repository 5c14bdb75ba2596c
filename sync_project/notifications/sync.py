"""Sync notifications: after a run, tell the customer's app what changed, as Nango's "webhooks from Nango".

The body says which (provider, sync, connection) ran, in which mode, whether it succeeded, the
merge counts, and ``modified_after``: the run's start time. Every record the run changed has
``last_modified_at >= modified_after`` (a writer stamps a change no earlier than the moment it
commits it, and the run started before its first write), so the consumer's next read is
``GET /records/{provider}/{object}?connection=...&modified_after=...`` and misses nothing. It may
also see changes of other writers made meanwhile; consumers upsert by id anyway.

Failed runs notify too (``success: false`` and ``error``): a polling run commits page by page, so
a run that failed on page 5 did change records, and ``modified_after`` still finds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from urllib.parse import quote, urlencode

from pydantic import BaseModel

from sync_project.notifications.delivery import DeliveryOutcome, deliver
from sync_project.store import MergeResult

log = logging.getLogger(__name__)

#: Error text sent to the consumer: the exception's message, bounded.
MAX_ERROR_CHARS = 1000


class SyncResults(BaseModel):
    added: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged: int = 0
    skipped_stale: int = 0
    skipped_missing: int = 0

    @property
    def changed(self) -> int:
        return self.added + self.updated + self.deleted

    @classmethod
    def of(cls, merged: MergeResult) -> SyncResults:
        return cls(**merged.as_dict())


class SyncNotification(BaseModel):
    """The JSON body POSTed to ``SYNC_NOTIFY_URL`` after a run."""

    type: Literal["sync"] = "sync"
    provider: str
    sync: str
    #: The sync's model class (what a record's ``data`` is).
    model: str
    connection_id: str
    mode: str
    success: bool
    run_id: str
    started_at: datetime
    finished_at: datetime
    #: Read the change feed from here: every record this run changed was modified at or after it.
    modified_after: datetime
    #: Merge counts; absent when the run failed before it could report them.
    results: SyncResults | None = None
    error: str | None = None
    #: The records API request that returns what this run changed (relative to the receiver).
    records_path: str

    @classmethod
    def build(
        cls,
        *,
        provider: str,
        sync: str,
        model: str,
        connection_id: str,
        mode: str,
        run_id: str,
        started_at: datetime,
        finished_at: datetime,
        results: SyncResults | None,
        error: str | None = None,
    ) -> SyncNotification:
        name = sync.split("/", 1)[1]
        query = urlencode({"connection": connection_id, "modified_after": started_at.isoformat()})
        return cls(
            provider=provider,
            sync=sync,
            model=model,
            connection_id=connection_id,
            mode=mode,
            success=error is None,
            run_id=run_id,
            started_at=started_at,
            finished_at=finished_at,
            modified_after=started_at,
            results=results,
            error=None if error is None else error[:MAX_ERROR_CHARS],
            records_path=f"/records/{quote(provider, safe='')}/{quote(name, safe='')}?{query}",
        )

    @property
    def message_id(self) -> str:
        """The ``webhook-id``: one per run, the same on every retry, so consumers dedupe on it."""
        return f"sync_{self.run_id}"


@dataclass(frozen=True)
class NotificationOutcome:
    """What became of a run's notification: ``delivered``, ``failed`` or ``skipped``."""

    status: Literal["delivered", "failed", "skipped"]
    #: One line starting with the status, e.g. ``failed after 3 attempt(s): HTTP 503``.
    detail: str
    attempts: int = 0

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class SyncNotifier:
    """Sends notifications to one URL, signed with one Standard Webhooks secret (``whsec_...``)."""

    url: str
    secret: str = field(repr=False)
    #: Notify after runs that changed nothing too (default: only runs with changes, and failures).
    every_run: bool = False
    #: The most a run waits for its notification, retries included.
    total_timeout_s: float = 10.0
    attempt_timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 0.25

    def wants(self, notification: SyncNotification) -> bool:
        if not notification.success or self.every_run:
            return True
        return notification.results is not None and notification.results.changed > 0

    def send(self, notification: SyncNotification) -> NotificationOutcome:
        """Deliver within the time budget; never raises (a notification must not fail a run)."""
        if not self.wants(notification):
            return NotificationOutcome("skipped", "skipped: nothing changed")
        try:
            outcome: DeliveryOutcome = deliver(
                self.url,
                self.secret,
                notification.message_id,
                notification.model_dump_json().encode(),
                total_timeout_s=self.total_timeout_s,
                max_attempts=self.max_attempts,
                attempt_timeout_s=self.attempt_timeout_s,
                backoff_s=self.backoff_s,
            )
        except Exception as error:  # noqa: BLE001 - e.g. an unusable secret: reported, not raised
            log.warning("sync notification not sent: %s", type(error).__name__)
            return NotificationOutcome("failed", f"failed, not sent: {type(error).__name__}: {error}"[:300])
        status: Literal["delivered", "failed"] = "delivered" if outcome.delivered else "failed"
        return NotificationOutcome(status, outcome.summary(), attempts=len(outcome.attempts))
