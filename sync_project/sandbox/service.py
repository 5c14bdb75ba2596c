"""The sandbox as one object: data, webhook delivery, change generator and rate limiter, wired up.

:class:`Sandbox` knows nothing of HTTP; :mod:`sync_project.sandbox.app` serves it and
:mod:`sync_project.sandbox.server` runs that app under uvicorn.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sync_project.core import standard_webhooks
from sync_project.sandbox.chaos import Chaos, ChaosSettings
from sync_project.sandbox.data import SandboxState
from sync_project.sandbox.generator import ChangeGenerator, GeneratorSettings
from sync_project.sandbox.persistence import SandboxJournal
from sync_project.sandbox.ratelimit import RateLimiter, RateLimitSettings
from sync_project.sandbox.webhooks import DeliveryWorker, RetryPolicy


class AccountSpec(BaseModel):
    """An account to create: the id and token are generated when not given."""

    model_config = ConfigDict(extra="forbid")

    account_id: str | None = None
    token: str | None = Field(default=None, repr=False)
    #: Records that exist before anyone subscribed (no webhooks announce them).
    contacts: int = Field(default=0, ge=0, le=100_000)
    deals: int = Field(default=0, ge=0, le=100_000)


class SandboxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Seeds the data RNG (and, offset, the chaos RNG): same seed + same calls = same data.
    seed: int = 0
    webhook_url: str | None = None
    #: ``whsec_...``; generated when not given.
    webhook_secret: str | None = Field(default=None, repr=False)
    #: Bearer token of the /admin endpoints; generated when not given.
    admin_token: str | None = Field(default=None, repr=False)
    accounts: list[AccountSpec] = Field(default_factory=list)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    chaos: ChaosSettings = Field(default_factory=ChaosSettings)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    #: A SQLite file that keeps accounts and records across restarts; None keeps them in memory.
    data_path: Path | None = None


class Sandbox:
    """The fake CRM's state and background workers; start() and stop() the workers."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.webhook_secret = self.config.webhook_secret or standard_webhooks.generate_secret()
        self.admin_token = self.config.admin_token or "adm_" + secrets.token_urlsafe(24)
        self.deliveries = DeliveryWorker(
            self.webhook_secret,
            url=self.config.webhook_url,
            retry=self.config.retry,
            chaos=Chaos(self.config.chaos, seed=self.config.seed + 1),
        )
        self.journal = SandboxJournal(self.config.data_path) if self.config.data_path is not None else None
        self.state = SandboxState(seed=self.config.seed, on_change=self.deliveries.submit, journal=self.journal)
        #: Accounts the data file already held when this sandbox started.
        self.restored_accounts: list[str] = self.state.account_ids()
        self.rate_limiter = RateLimiter(self.config.rate_limit)
        #: account id -> API token of the accounts of ``config.accounts``.
        self.accounts: dict[str, str] = {}
        for spec in self.config.accounts:
            if spec.account_id is not None and spec.account_id in self.restored_accounts:
                # Kept from the last run, data and all; only its token is new (the file keeps
                # none, so nobody could use the account otherwise).
                self.accounts[spec.account_id] = self.state.set_token(spec.account_id, spec.token)
                continue
            account = self.state.create_account(spec.account_id, spec.token, contacts=spec.contacts, deals=spec.deals)
            self.accounts[account.account_id] = account.token or ""
        self.generator = ChangeGenerator(self.state, self.config.generator)

    def start(self) -> None:
        self.deliveries.start()
        self.generator.start()

    def stop(self) -> None:
        self.generator.stop()
        self.deliveries.stop()

    def close(self) -> None:
        """Release the data file, once nothing serves requests any more."""
        if self.journal is not None:
            self.journal.close()
