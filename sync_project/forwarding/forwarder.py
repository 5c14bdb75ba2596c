"""The forwarder: a worker of its own that passes stored webhook events on to the customer's app.

Why a separate process (``sync-project forwarder run``) rather than a thread of the receiver or a
Dagster sensor: a customer endpoint that is slow or down must never slow the receiver (its event
loop and group-commit thread are tuned for throughput, and it must answer providers within their
deadlines) nor the syncs (a sensor tick has 60 s and shares the daemon). As its own process it
costs the receiver nothing, holds all its state in the database (``forwards``), so it can be
stopped, restarted or run twice without losing or doubling work, and it scales on its own.

One round (:meth:`Forwarder.run_once`): read new inbox rows into the queue, claim the due
forwards, POST them concurrently (Standard Webhooks signature, one attempt each, bounded by
``attempt_timeout_s``), and record each outcome: delivered, due again after an exponential
backoff, or dead after ``max_attempts`` (``sync-project forwarder replay``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import httpx
from pydantic import BaseModel, Field, field_validator

from sync_project.core.standard_webhooks import WebhookSecretError, decode_secret
from sync_project.notifications.delivery import Attempt, post_signed
from sync_project.store import Forward, Forwards, StartAt, Store, StoreUnavailableError

URL_ENV = "SYNC_FORWARD_URL"
SECRET_ENV = "SYNC_FORWARD_SECRET"

log = logging.getLogger("sync_project.forwarder")


class ForwardingConfigError(ValueError):
    pass


class ForwarderSettings(BaseModel):
    """Where to forward and how hard to try."""

    url: str = Field(min_length=1)
    #: A Standard Webhooks secret (``whsec_`` + base64); the customer's app verifies with it.
    secret: str = Field(min_length=1, repr=False)
    #: Forwards in flight at once: a slow endpoint holds at most this many workers.
    concurrency: int = Field(default=4, ge=1, le=64)
    batch: int = Field(default=50, ge=1, le=1000)
    attempt_timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    #: Backoff after the n-th failure: ``base_delay_s * 2**(n-1)``, capped at ``max_delay_s``.
    base_delay_s: float = Field(default=2.0, gt=0)
    max_delay_s: float = Field(default=3600.0, gt=0)
    #: Sleep between rounds that found nothing to do.
    idle_s: float = Field(default=0.5, gt=0)
    start_at: StartAt = "now"
    settle_s: float = Field(default=30.0, ge=0)

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, secret: str) -> str:
        try:
            decode_secret(secret)
        except WebhookSecretError as error:
            raise ValueError(str(error)) from None
        return secret

    @property
    def lease_s(self) -> float:
        """How long a claimed forward is someone's: its attempt, plus margin."""
        return self.attempt_timeout_s * 2 + 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> ForwarderSettings:
        env = os.environ if environ is None else environ
        url, secret = env.get(URL_ENV), env.get(SECRET_ENV)
        if not url:
            raise ForwardingConfigError(f"set {URL_ENV} to the customer app's webhook URL to forward deliveries")
        if not secret:
            raise ForwardingConfigError(f"{URL_ENV} is set but {SECRET_ENV} is not: forwards are always signed")
        try:
            return cls(url=url, secret=secret, **overrides)
        except ValueError as error:
            raise ForwardingConfigError(f"forwarding settings: {error}") from None


class ForwardBody(BaseModel):
    """What the customer's app receives: the event as the provider sent it, and where it belongs."""

    type: Literal["forward"] = "forward"
    provider: str
    #: The connection the event routes to; null when it routes to none.
    connection_id: str | None
    account_id: str | None
    event_type: str
    event_key: str
    received_at: datetime
    payload: dict

    @classmethod
    def of(cls, forward: Forward) -> ForwardBody:
        return cls(
            provider=forward.provider,
            connection_id=forward.connection_id or None,
            account_id=forward.account_id,
            event_type=forward.event_type,
            event_key=forward.event_key,
            received_at=forward.received_at,
            payload=forward.payload,
        )


@dataclass
class RoundResult:
    enqueued: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0

    @property
    def busy(self) -> bool:
        return bool(self.enqueued or self.delivered or self.retrying or self.dead)


class Forwarder:
    def __init__(self, store: Store, settings: ForwarderSettings, *, forwards: Forwards | None = None) -> None:
        self.settings = settings
        self.forwards = forwards or store.forwards(settle_s=settings.settle_s)
        self._client = httpx.Client(follow_redirects=False)
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="forward")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_once(self, *, now: datetime | None = None) -> RoundResult:
        """One round: enqueue new inbox rows, then one attempt for each due forward (a batch)."""
        result = RoundResult(enqueued=self.forwards.enqueue(start_at=self.settings.start_at, now=now))
        claimed = self.forwards.claim(limit=self.settings.batch, lease_s=self.settings.lease_s, now=now)
        for forward, attempt in zip(claimed, self._pool.map(self._attempt, claimed), strict=True):
            if attempt.ok:
                self.forwards.mark_delivered(forward.id, now=now)
                result.delivered += 1
                continue
            status = self.forwards.mark_failed(
                forward.id,
                attempt.describe(),
                max_attempts=self.settings.max_attempts,
                base_delay_s=self.settings.base_delay_s,
                max_delay_s=self.settings.max_delay_s,
                now=now,
            )
            where = f"forward {forward.id} ({forward.provider} {forward.event_key} -> {forward.connection_id or 'no connection'})"
            if status == "dead":
                result.dead += 1
                log.error("%s is dead after %d attempts: %s", where, self.settings.max_attempts, attempt.describe())
            else:
                result.retrying += 1
                log.warning("%s failed (attempt %d): %s; will retry", where, forward.attempts + 1, attempt.describe())
        return result

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set; an unavailable database is waited out, not fatal."""
        log.info("forwarding to the configured URL with %d worker(s)", self.settings.concurrency)
        while not stop.is_set():
            try:
                result = self.run_once()
            except StoreUnavailableError as error:
                log.warning("database unavailable, retrying: %s", type(error).__name__)
                stop.wait(max(self.settings.idle_s, 1.0))
                continue
            if result.busy:
                log.info(
                    "forwarded %d, retrying %d, dead %d, queued %d",
                    result.delivered,
                    result.retrying,
                    result.dead,
                    result.enqueued,
                )
            else:
                stop.wait(self.settings.idle_s)

    def _attempt(self, forward: Forward) -> Attempt:
        body = ForwardBody.of(forward).model_dump_json().encode()
        return post_signed(
            self._client,
            self.settings.url,
            self.settings.secret,
            forward.message_id,
            body,
            timeout_s=self.settings.attempt_timeout_s,
        )
