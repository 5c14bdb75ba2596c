"""Which connections a webhook delivery belongs to, decided in one place.

The receiver routes fresh deliveries and ``inbox replay --status unroutable`` re-routes kept ones;
both must agree, so both call :func:`connections_for`. It reads through :class:`ConnectionLookup`,
which both the live :class:`~sync_project.store.connections.Connections` and a
:class:`ConnectionSnapshot` (loaded once per receiver batch, inside its transaction) satisfy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

from sqlalchemy import and_, false, or_, select
from sqlalchemy.engine import Connection

from sync_project.store.connections import Connections, ProviderConnection
from sync_project.store.schema import connections as connections_table


class ConnectionLookup(Protocol):
    """The two reads routing needs (``Connections`` has exactly these)."""

    def for_account(self, provider: str, account_id: str) -> list[ProviderConnection]: ...

    def list(self, provider: str | None = None) -> list[ProviderConnection]: ...


def connections_for(lookup: ConnectionLookup, provider: str, account_id: str | None) -> list[ProviderConnection]:
    """The connections an event of ``provider`` naming ``account_id`` routes to.

    An event that names no account goes to every connection of its provider, as Nango does. Paused
    connections are included: their events wait in the inbox as pending until they resume.
    """
    if account_id is None:
        return lookup.list(provider)
    return lookup.for_account(provider, account_id)


class ConnectionSnapshot:
    """The connections a batch of deliveries can route to, read with one query.

    The receiver routes a whole group commit inside its transaction: one SELECT for the batch instead
    of one per delivery, and the routing sees the same connections table the insert commits against.
    """

    def __init__(self, rows: Iterable[ProviderConnection]) -> None:
        self._by_provider: dict[str, list[ProviderConnection]] = defaultdict(list)
        self._by_account: dict[tuple[str, str], list[ProviderConnection]] = defaultdict(list)
        for connection in sorted(rows, key=lambda c: (c.provider, c.connection_id)):
            self._by_provider[connection.provider].append(connection)
            if connection.account_id is not None:
                self._by_account[(connection.provider, connection.account_id)].append(connection)

    @classmethod
    def load(cls, conn: Connection, wanted: Iterable[tuple[str, str | None]]) -> ConnectionSnapshot:
        """Read the connections that ``wanted`` (provider, account id or None) pairs can reach."""
        accounts: dict[str, set[str]] = defaultdict(set)
        whole_providers: set[str] = set()
        for provider, account_id in wanted:
            if account_id is None:
                whole_providers.add(provider)
            elif isinstance(account_id, str):  # anything else fails the event's validation later
                accounts[provider].add(account_id)
        clauses = [
            and_(connections_table.c.provider == provider, connections_table.c.account_id.in_(sorted(ids)))
            for provider, ids in accounts.items()
            if provider not in whole_providers
        ]
        if whole_providers:
            clauses.append(connections_table.c.provider.in_(sorted(whole_providers)))
        if not clauses:
            return cls(())
        rows = conn.execute(select(connections_table).where(or_(false(), *clauses))).mappings()
        return cls(Connections._model(row) for row in rows)

    @classmethod
    def load_all(cls, conn: Connection) -> ConnectionSnapshot:
        """Every connection: what a receiver keeps between batches (see receiver.writer)."""
        return cls(Connections._model(row) for row in conn.execute(select(connections_table)).mappings())

    def knows(self, provider: str, account_id: str | None) -> bool:
        """Whether routing an event naming ``account_id`` can be decided from this snapshot alone:
        a known account, or a whole provider (no account named)."""
        return account_id is None or (provider, account_id) in self._by_account

    def for_account(self, provider: str, account_id: str) -> list[ProviderConnection]:
        return list(self._by_account.get((provider, account_id), ()))

    def list(self, provider: str | None = None) -> list[ProviderConnection]:
        if provider is None:
            return [c for group in self._by_provider.values() for c in group]
        return list(self._by_provider.get(provider, ()))
