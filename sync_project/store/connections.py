"""Connections: one customer's account at a provider, and the Dagster partition that syncs it."""

from __future__ import annotations

import builtins
import json
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from sync_project.core.clock import utcnow
from sync_project.core.connection import ConnectionStatus, ProviderConnection
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.errors import StoreError, UnknownConnectionError
from sync_project.store.schema import connections


class DuplicateConnectionError(StoreError):
    pass


class Connections:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(
        self,
        provider: str,
        connection_id: str,
        *,
        account_id: str | None = None,
        credentials_env: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> ProviderConnection:
        _check_partition_key(connection_id)
        now = utcnow()
        row = {
            "provider": provider,
            "connection_id": connection_id,
            "account_id": account_id,
            "credentials_env": credentials_env,
            "config": json.dumps(config or {}, sort_keys=True),
            "status": "active",
            "created_at": now,
            "updated_at": now,
        }
        try:
            with unavailable_as_store_error(), self._engine.begin() as conn:
                conn.execute(insert(connections).values(**row))
        except IntegrityError:
            raise DuplicateConnectionError(f"connection {provider}/{connection_id} already exists") from None
        return self._model(row)

    def get(self, provider: str, connection_id: str) -> ProviderConnection:
        with unavailable_as_store_error(), reading(self._engine) as conn:
            row = conn.execute(
                select(connections).where(
                    connections.c.provider == provider, connections.c.connection_id == connection_id
                )
            ).mappings().first()
        if row is None:
            raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")
        return self._model(row)

    def list(self, provider: str | None = None, *, status: ConnectionStatus | None = None) -> list[ProviderConnection]:
        query = select(connections).order_by(connections.c.provider, connections.c.connection_id)
        if provider is not None:
            query = query.where(connections.c.provider == provider)
        if status is not None:
            query = query.where(connections.c.status == status)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [self._model(row) for row in conn.execute(query).mappings()]

    # builtins.list: inside the class, `list` is the method above.
    def for_account(self, provider: str, account_id: str) -> builtins.list[ProviderConnection]:
        """The connections a webhook naming ``account_id`` routes to."""
        query = select(connections).where(
            connections.c.provider == provider, connections.c.account_id == account_id
        )
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [self._model(row) for row in conn.execute(query).mappings()]

    def set_status(self, provider: str, connection_id: str, status: ConnectionStatus) -> ProviderConnection:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            changed = conn.execute(
                update(connections)
                .where(connections.c.provider == provider, connections.c.connection_id == connection_id)
                .values(status=status, updated_at=utcnow())
            ).rowcount
        if not changed:
            raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")
        return self.get(provider, connection_id)

    def remove(self, provider: str, connection_id: str) -> None:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            removed = conn.execute(
                delete(connections).where(
                    connections.c.provider == provider, connections.c.connection_id == connection_id
                )
            ).rowcount
        if not removed:
            raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")

    @staticmethod
    def _model(row: Any) -> ProviderConnection:
        values = dict(row)
        values["config"] = json.loads(values["config"] or "{}")
        return ProviderConnection.model_validate(values)


def _check_partition_key(connection_id: str) -> None:
    # Connection ids become Dagster dynamic partition keys: the UI cannot backfill keys with
    # commas, and Dagster rejects "..." and control characters.
    if not connection_id or connection_id != connection_id.strip():
        raise ValueError("connection id must be non-empty, without surrounding spaces")
    if "," in connection_id or "..." in connection_id or any(ord(ch) < 32 for ch in connection_id):
        raise ValueError(f"connection id {connection_id!r} may not contain ',', '...' or control characters")
    if len(connection_id) > 255:
        raise ValueError("connection id longer than 255 characters")
