"""Errors the store raises. Callers branch on these, never on driver exceptions."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the records store raises on purpose."""


class InvalidBatchError(StoreError, ValueError):
    """A batch the store refuses as a whole: nothing of it is written."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or is too busy; the caller should retry later (HTTP 503)."""


class SyncAlreadyRunningError(StoreError):
    """Another run holds the run lock of this (sync, connection)."""


class UnknownConnectionError(StoreError, LookupError):
    """No connection with that provider and id is registered."""
