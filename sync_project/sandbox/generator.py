"""The change generator: random creates, updates and deletes at a steady rate, on a thread.

The randomness comes from the state's seeded RNG, so what changes is reproducible for a given seed
and sequence of calls; only the timing is the wall clock's.
"""

from __future__ import annotations

import threading
import time

from pydantic import BaseModel, ConfigDict, Field

from sync_project.sandbox.data import SandboxError, SandboxState
from sync_project.sandbox.fake import ChangeMix


class GeneratorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    running: bool = False
    #: Changes per second, over all targeted accounts.
    rate_per_s: float = Field(default=1.0, gt=0, le=1000)
    mix: ChangeMix = Field(default_factory=ChangeMix)
    #: Accounts to change; None means every account (including ones created later).
    account_ids: list[str] | None = None


class GeneratorStatus(BaseModel):
    settings: GeneratorSettings
    applied: int
    last_error: str | None


class ChangeGenerator:
    def __init__(self, state: SandboxState, settings: GeneratorSettings | None = None) -> None:
        self._state = state
        self._settings = settings or GeneratorSettings()
        self._applied = 0
        self._last_error: str | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="sandbox-generator", daemon=True)
                self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def configure(self, settings: GeneratorSettings) -> GeneratorStatus:
        known = set(self._state.account_ids())
        unknown = sorted(set(settings.account_ids or ()) - known)
        if unknown:
            raise SandboxError(f"unknown account(s): {', '.join(unknown)}")
        with self._cond:
            self._settings = settings
            self._cond.notify_all()
        return self.status()

    def status(self) -> GeneratorStatus:
        with self._cond:
            return GeneratorStatus(settings=self._settings, applied=self._applied, last_error=self._last_error)

    def _run(self) -> None:
        owed, last = 0.0, time.monotonic()
        # Changes are applied with _cond held (wait() releases it), so once configure() has turned
        # the generator off, no late batch lands.
        with self._cond:
            while True:
                while not self._stopping and not self._settings.running:
                    self._cond.wait()
                    owed, last = 0.0, time.monotonic()
                if self._stopping:
                    return
                settings = self._settings
                now = time.monotonic()
                # Owed changes accrue continuously; a stall is caught up by at most a second's worth.
                owed = min(owed + (now - last) * settings.rate_per_s, max(1.0, settings.rate_per_s))
                last = now
                if (due := int(owed)) > 0:
                    owed -= due
                    self._apply(due, settings)
                self._cond.wait(min((1.0 - owed) / settings.rate_per_s, 1.0))

    def _apply(self, count: int, settings: GeneratorSettings) -> None:
        """Called with ``_cond`` held."""
        try:
            self._state.apply_random(count, mix=settings.mix, account_ids=settings.account_ids)
        except SandboxError as error:  # e.g. no account yet: keep running, say why nothing happens
            self._last_error = str(error)
            return
        self._applied += count
        self._last_error = None
