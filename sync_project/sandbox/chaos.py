"""Chaos knobs: how the sandbox mistreats its webhooks, to prove the syncs converge anyway.

Everything defaults to off. Outages of the receiver need no knob: deliveries that fail are retried
with backoff (see :mod:`sync_project.sandbox.webhooks`), exactly as a real provider's would be, and
``paused`` models an outage on the provider's side (events queue up, nothing is sent).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class ChaosSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Percentage of events never delivered at all.
    drop_pct: float = Field(default=0.0, ge=0, le=100)
    #: Percentage of events delivered twice, with the same ``webhook-id``.
    duplicate_pct: float = Field(default=0.0, ge=0, le=100)
    #: Each delivery is held a random 0..delay_s seconds, so deliveries within this window arrive shuffled.
    delay_s: float = Field(default=0.0, ge=0, le=3600)
    #: Hold every delivery (queued, not sent) until unpaused.
    paused: bool = False


@dataclass(frozen=True)
class Fate:
    """What chaos decided for one event: the hold before each copy is sent; none = dropped."""

    holds_s: tuple[float, ...]

    @property
    def dropped(self) -> bool:
        return not self.holds_s

    @property
    def duplicated(self) -> bool:
        return len(self.holds_s) > 1


class Chaos:
    """Seeded decisions, so a test run with the same seed and events mistreats the same events.

    Not thread-safe by itself; the delivery worker calls it under its lock.
    """

    def __init__(self, settings: ChaosSettings | None = None, *, seed: int = 0) -> None:
        self.settings = settings or ChaosSettings()
        self._rng = random.Random(seed)

    def fate(self) -> Fate:
        settings = self.settings
        # Draw every number whatever the settings, so turning one knob does not reshuffle the others.
        drop_roll, duplicate_roll = self._rng.random() * 100, self._rng.random() * 100
        holds = (self._rng.random() * settings.delay_s, self._rng.random() * settings.delay_s)
        if drop_roll < settings.drop_pct:
            return Fate(())
        return Fate(holds if duplicate_roll < settings.duplicate_pct else holds[:1])
