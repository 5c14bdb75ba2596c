"""The notifier as a Dagster resource, configured from the environment by reference.

``SYNC_NOTIFY_URL`` turns notifications on; ``SYNC_NOTIFY_SECRET`` (a Standard Webhooks
``whsec_...`` secret) signs them and is then required, so nothing is ever sent unsigned.
``SYNC_NOTIFY_EVERY_RUN=1`` also notifies runs that changed nothing. The resource holds
``dg.EnvVar`` references, resolved by Dagster in the run's process, so neither value sits in code,
in the definitions, or in the UI (which shows the variable names).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg
from pydantic import Field

from sync_project.core.standard_webhooks import WebhookSecretError, decode_secret
from sync_project.notifications.sync import SyncNotifier

URL_ENV = "SYNC_NOTIFY_URL"
SECRET_ENV = "SYNC_NOTIFY_SECRET"
EVERY_RUN_ENV = "SYNC_NOTIFY_EVERY_RUN"
#: The resource key the sync assets ask for.
NOTIFIER_KEY = "sync_notifier"


class NotificationConfigError(ValueError):
    """Notifications are half configured (a URL without a usable secret)."""


class NotifierResource(dg.ConfigurableResource):
    """Where and how runs notify; ``url`` unset means notifications are off."""

    url: str | None = None
    secret: str | None = Field(default=None, repr=False)
    every_run: bool = False
    #: A run waits at most this long for its notification, retries included.
    total_timeout_s: float = 10.0
    attempt_timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_s: float = 0.25

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NotifierResource:
        """Off when ``SYNC_NOTIFY_URL`` is unset; else references to both variables.

        Checked here, when the code location loads, so a URL without a usable secret is a clear
        error in the UI rather than every run's notification failing.
        """
        env = os.environ if environ is None else environ
        if not env.get(URL_ENV):
            return cls()
        secret = env.get(SECRET_ENV)
        if not secret:
            raise NotificationConfigError(f"{URL_ENV} is set but {SECRET_ENV} is not: notifications are always signed")
        try:
            decode_secret(secret)
        except WebhookSecretError as error:
            raise NotificationConfigError(f"{SECRET_ENV}: {error}") from None
        every_run = env.get(EVERY_RUN_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        return cls(url=dg.EnvVar(URL_ENV), secret=dg.EnvVar(SECRET_ENV), every_run=every_run)

    def get_notifier(self) -> SyncNotifier | None:
        """None when off. A URL without a secret still gives a notifier, whose every send then
        fails visibly (an unsigned notification is never sent) without failing the run."""
        if not self.url:
            return None
        return SyncNotifier(
            url=self.url,
            secret=self.secret or "",
            every_run=self.every_run,
            total_timeout_s=self.total_timeout_s,
            attempt_timeout_s=self.attempt_timeout_s,
            max_attempts=self.max_attempts,
            backoff_s=self.backoff_s,
        )
