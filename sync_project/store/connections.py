"""Connections: one customer's account at a provider, and the Dagster partition that syncs it."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from sync_project.core import credentials as secrets
from sync_project.core.clock import utcnow
from sync_project.core.connection import ConnectionStatus, ProviderConnection
from sync_project.store.engine import reading, unavailable_as_store_error
from sync_project.store.errors import StoreError, UnknownConnectionError
from sync_project.store.schema import connections, connections_revision

if TYPE_CHECKING:
    from sync_project.store.routing import ConnectionSnapshot

#: Polling faster than this would poll faster than runs start (the same floor as a sync's).
MIN_POLL_INTERVAL_S = 30


class _Unset:
    """A keyword left out (None means "back to the sync's default")."""


UNSET: Any = _Unset()


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
        credentials_file: str | None = None,
        credentials_secret: str | None = None,
        credentials_value: str | None = None,
        config: dict[str, Any] | None = None,
        poll_interval_s: int | None = None,
        full_refresh_interval_s: int | None = None,
    ) -> ProviderConnection:
        """``credentials_value`` is the secret itself, stored sealed (needs SYNC_CREDENTIALS_KEY);
        the other ``credentials_*`` are references resolved by each run."""
        _check_partition_key(connection_id)
        now = utcnow()
        row = {
            "provider": provider,
            "connection_id": connection_id,
            "account_id": account_id,
            **credential_columns(
                f"connection {provider}/{connection_id}",
                env=credentials_env,
                file=credentials_file,
                secret=credentials_secret,
                value=credentials_value,
            ),
            "config": json.dumps(config or {}, sort_keys=True),
            "status": "active",
            "poll_interval_s": _check_poll_interval(poll_interval_s),
            "full_refresh_interval_s": _check_full_refresh_interval(full_refresh_interval_s),
            "created_at": now,
            "updated_at": now,
        }
        from sync_project.store.inbox import restore_orphaned

        try:
            with unavailable_as_store_error(), self._engine.begin() as conn:
                conn.execute(insert(connections).values(**row))
                _moved(conn)
                # Events left pending when a connection of this id was removed are its work again.
                restore_orphaned(conn, provider=provider, connection_id=connection_id)
        except IntegrityError:
            raise DuplicateConnectionError(f"connection {provider}/{connection_id} already exists") from None
        return self._model(row)

    def get(self, provider: str, connection_id: str) -> ProviderConnection:
        with unavailable_as_store_error(), reading(self._engine) as conn:
            row = (
                conn.execute(
                    select(connections).where(
                        connections.c.provider == provider, connections.c.connection_id == connection_id
                    )
                )
                .mappings()
                .first()
            )
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
        query = select(connections).where(connections.c.provider == provider, connections.c.account_id == account_id)
        with unavailable_as_store_error(), reading(self._engine) as conn:
            return [self._model(row) for row in conn.execute(query).mappings()]

    def set_status(self, provider: str, connection_id: str, status: ConnectionStatus) -> ProviderConnection:
        with unavailable_as_store_error(), self._engine.begin() as conn:
            changed = conn.execute(
                update(connections)
                .where(connections.c.provider == provider, connections.c.connection_id == connection_id)
                .values(status=status, updated_at=utcnow())
            ).rowcount
            _moved(conn, changed)
        if not changed:
            raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")
        return self.get(provider, connection_id)

    def configure(
        self,
        provider: str,
        connection_id: str,
        *,
        poll_interval_s: int | None = UNSET,
        full_refresh_interval_s: int | None = UNSET,
        credentials: dict[str, str | None] | None = None,
    ) -> ProviderConnection:
        """Change a connection's own settings; a keyword left out keeps its value, None returns an
        interval to its sync's. ``credentials`` (at most one of ``env``, ``file``, ``secret`` or
        ``value``, the secret itself, sealed here) replaces the reference. Runs read these when
        they start, so nothing restarts."""
        values: dict[str, Any] = {}
        if poll_interval_s is not UNSET:
            values["poll_interval_s"] = _check_poll_interval(poll_interval_s)
        if full_refresh_interval_s is not UNSET:
            values["full_refresh_interval_s"] = _check_full_refresh_interval(full_refresh_interval_s)
        if credentials is not None:
            values.update(credential_columns(f"connection {provider}/{connection_id}", **credentials))
        if not values:
            return self.get(provider, connection_id)
        with unavailable_as_store_error(), self._engine.begin() as conn:
            changed = conn.execute(
                update(connections)
                .where(connections.c.provider == provider, connections.c.connection_id == connection_id)
                .values(**values, updated_at=utcnow())
            ).rowcount
            _moved(conn, changed)
        if not changed:
            raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")
        return self.get(provider, connection_id)

    def snapshot(self, conn: Connection, wanted: Iterable[tuple[str, str | None]] | None = None) -> ConnectionSnapshot:
        """The connections (all, or of the (provider, account) pairs in ``wanted``) read in
        ``conn``'s transaction, for routing many events without a query each."""
        from sync_project.store.routing import ConnectionSnapshot

        return ConnectionSnapshot.load_all(conn) if wanted is None else ConnectionSnapshot.load(conn, wanted)

    def version(self, conn: Connection) -> int:
        """The table's revision: it moves with every add, remove and change made through this
        class, in the writing transaction, so a snapshot read after it is at least that new."""
        return int(conn.execute(_REVISION).scalar() or 0)

    def remove(self, provider: str, connection_id: str) -> int:
        """Remove the connection; its pending webhook events become ``orphaned`` in the same
        transaction (kept; pending again if it is added back). Returns how many were orphaned."""
        from sync_project.store.inbox import orphan_pending

        with unavailable_as_store_error(), self._engine.begin() as conn:
            removed = conn.execute(
                delete(connections).where(
                    connections.c.provider == provider, connections.c.connection_id == connection_id
                )
            ).rowcount
            if not removed:
                raise UnknownConnectionError(f"no connection {connection_id!r} for provider {provider!r}")
            _moved(conn)
            return orphan_pending(conn, provider, connection_id)

    @staticmethod
    def _model(row: Any) -> ProviderConnection:
        values = dict(row)
        values["config"] = json.loads(values["config"] or "{}")
        return ProviderConnection.model_validate(values)


_REVISION = select(connections_revision.c.revision).where(connections_revision.c.id == 1)
_BUMP = (
    update(connections_revision)
    .where(connections_revision.c.id == 1)
    .values(revision=connections_revision.c.revision + 1)
)


def _moved(conn: Connection, changed: int = 1) -> None:
    """Moves the revision in ``conn``'s transaction (a write that ``changed`` nothing leaves it)."""
    if changed:
        conn.execute(_BUMP)


def credential_columns(
    what: str, *, env: str | None = None, file: str | None = None, secret: str | None = None, value: str | None = None
) -> dict[str, str | None]:
    """The four credentials columns for at most one reference (``value``: the secret, sealed here)."""
    given = [name for name, ref in (("env", env), ("file", file), ("secret", secret), ("value", value)) if ref]
    if len(given) > 1:
        raise ValueError(f"{what}: give one credentials reference, not {' and '.join(given)}")
    if env is not None and (not env or not env.replace("_", "a").isalnum() or env[0].isdigit()):
        raise ValueError(f"{what}: {env!r} is not an environment variable name")
    return {
        "credentials_env": env or None,
        "credentials_file": secrets.check_file_path(file) if file else None,
        "credentials_secret": secrets.check_secret_key(secret) if secret else None,
        "credentials_sealed": secrets.seal(value, what) if value else None,
    }


def _check_poll_interval(seconds: int | None) -> int | None:
    if seconds is not None and not (isinstance(seconds, int) and seconds >= MIN_POLL_INTERVAL_S):
        raise ValueError(f"poll interval must be at least {MIN_POLL_INTERVAL_S} s, got {seconds!r}")
    return seconds


def _check_full_refresh_interval(seconds: int | None) -> int | None:
    if seconds is not None and not (isinstance(seconds, int) and (seconds == 0 or seconds >= MIN_POLL_INTERVAL_S)):
        raise ValueError(
            f"full-refresh interval must be 0 (never) or at least {MIN_POLL_INTERVAL_S} s, got {seconds!r}"
        )
    return seconds


def _check_partition_key(connection_id: str) -> None:
    # Connection ids become Dagster dynamic partition keys: the UI cannot backfill keys with
    # commas, and Dagster rejects "..." and control characters.
    if not connection_id or connection_id != connection_id.strip():
        raise ValueError("connection id must be non-empty, without surrounding spaces")
    if "," in connection_id or "..." in connection_id or any(ord(ch) < 32 for ch in connection_id):
        raise ValueError(f"connection id {connection_id!r} may not contain ',', '...' or control characters")
    if len(connection_id) > 255:
        raise ValueError("connection id longer than 255 characters")
