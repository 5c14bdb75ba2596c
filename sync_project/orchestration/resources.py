"""Dagster resources, configured in one place (``definitions.py``)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import PrivateAttr

from sync_project import settings

if TYPE_CHECKING:
    from sync_project.store import Store

#: URLs whose schema this process has brought to the newest revision already.
_migrated: set[str] = set()
_migrated_lock = threading.Lock()


def open_store(url: str) -> Store:
    """A new store for ``url``, migrated by the first open of ``url`` in this process only.

    Sensors tick every few seconds and each tick opens the store: the migration check (a
    transaction under the migration lock) belongs to the process, not to the tick. The lock is
    held through the first migration, so two threads of one process never both run it.
    """
    from sync_project.store import Store  # the store (and SQLAlchemy) when a run or tick opens one

    with _migrated_lock:
        if url not in _migrated:
            store = Store(url)
            _migrated.add(url)
            return store
    return Store(url, migrate_schema=False)


class StoreResource(dg.ConfigurableResource):
    """The records store. ``database_url`` unset means ``SYNC_DATABASE_URL`` or the embedded default.

    The URL is a config reference (``dg.EnvVar``) in production, so no password sits in code.

    Each execution that uses it (a run, a sensor or schedule tick, a check) gets a store of its
    own, opened when Dagster sets the resource up and closed when Dagster tears it down, so a
    long-lived process (the code server, a test session) holds no connection between executions.
    """

    database_url: str | None = None

    _store: Store | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._store = open_store(self.database_url or settings.database_url())

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def get_store(self) -> Store:
        """The store of the current execution."""
        if self._store is None:
            raise dg.DagsterInvariantViolationError(
                "StoreResource.get_store() is only available while Dagster executes with the resource "
                "(a run, or a sensor or schedule context entered with `with`); elsewhere open "
                "`sync_project.store.Store(url)` as a context manager."
            )
        return self._store


def storage_kind(url: str | None = None) -> str:
    """The records store's backend, shown as an asset kind in the UI."""
    url = url or settings.database_url()
    return "postgres" if url.startswith("postgres") else "sqlite"
