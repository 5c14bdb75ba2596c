"""Dagster resources, configured in one place (``definitions.py``)."""

from __future__ import annotations

import threading

import dagster as dg

from sync_project import settings
from sync_project.store import Store

_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


class StoreResource(dg.ConfigurableResource):
    """The records store. ``database_url`` unset means ``SYNC_DATABASE_URL`` or the embedded default.

    The URL is a config reference (``dg.EnvVar``) in production, so no password sits in code.
    """

    database_url: str | None = None

    def get_store(self) -> Store:
        """One open store per process and URL: sensors tick every few seconds and must not
        re-create engines and re-check migrations each time."""
        url = self.database_url or settings.database_url()
        with _stores_lock:
            store = _stores.get(url)
            if store is None:
                store = _stores[url] = Store(url)
            return store


def storage_kind(url: str | None = None) -> str:
    """The records store's backend, shown as an asset kind in the UI."""
    url = url or settings.database_url()
    return "postgres" if url.startswith("postgres") else "sqlite"
