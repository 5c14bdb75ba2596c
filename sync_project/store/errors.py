"""Errors the store raises. Callers branch on these, never on driver exceptions."""

from __future__ import annotations

from datetime import datetime

from sync_project.core.errors import InvalidBatchError, StoreError

__all__ = [
    "InvalidBatchError",
    "LeaseHeldError",
    "LeaseLostError",
    "StoreError",
    "StoreUnavailableError",
    "UnknownConnectionError",
]


class StoreUnavailableError(StoreError):
    """The database cannot be reached or is too busy; the caller should retry later (HTTP 503)."""


class LeaseHeldError(StoreError):
    """Another run holds this (sync, connection)'s lease and it has not expired."""

    def __init__(self, message: str, *, holder: str | None = None, expires_at: datetime | None = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.expires_at = expires_at


class LeaseLostError(StoreError):
    """This run's lease was granted to another run: the transaction that found out wrote nothing."""


class UnknownConnectionError(StoreError, LookupError):
    """No connection with that provider and id is registered."""
