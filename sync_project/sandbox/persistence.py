"""The sandbox's data on disk (SQLite), so a restarted sandbox is the same provider as before.

A real provider does not forget its customers' records when it restarts, and the demo should not
either: ``make run`` keeps the records store under ``data/``, and a sandbox that started empty
after every restart made the store disagree with it (records of the old run, ids reissued with
other content). The journal is written through: every change is committed, in the transaction of
the call that made it, before its webhooks are queued, so nothing a receiver hears of is missing
from the sandbox after a crash.

Account tokens are kept as SHA-256 digests only: the file holds no credential. A restarted
sandbox therefore cannot tell its accounts' tokens; the admin API sets a new one
(``POST /admin/accounts/{id}/token``), as ``sync-project dev`` does on every start.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS objects (
    account_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    data TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    PRIMARY KEY (account_id, kind, object_id)
);
CREATE TABLE IF NOT EXISTS counters (
    account_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    issued INTEGER NOT NULL,
    PRIMARY KEY (account_id, kind)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class StoredCollection:
    live: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: int = 0


@dataclass
class StoredAccount:
    account_id: str
    token_sha256: str
    collections: dict[str, StoredCollection] = field(default_factory=dict)


@dataclass
class Snapshot:
    accounts: list[StoredAccount]
    #: The newest timestamp the sandbox's clock handed out (ISO text), so a restarted clock
    #: continues after it even if the wall clock stepped back.
    clock_last: str | None


@dataclass(frozen=True)
class ObjectRow:
    account_id: str
    kind: str
    object_id: str
    data: dict[str, Any]
    deleted: bool


class SandboxJournal:
    """One SQLite file; :meth:`commit` writes one call's changes in one transaction."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The sandbox calls it under its own lock, from whichever thread made the change.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def load(self) -> Snapshot:
        with self._lock:
            accounts = {
                account_id: StoredAccount(account_id, digest)
                for account_id, digest in self._conn.execute("SELECT account_id, token_sha256 FROM accounts")
            }
            for account_id, kind, object_id, data, deleted in self._conn.execute(
                "SELECT account_id, kind, object_id, data, deleted FROM objects"
            ):
                collection = accounts[account_id].collections.setdefault(kind, StoredCollection())
                (collection.deleted if deleted else collection.live)[object_id] = json.loads(data)
            for account_id, kind, issued in self._conn.execute("SELECT account_id, kind, issued FROM counters"):
                accounts[account_id].collections.setdefault(kind, StoredCollection()).issued = issued
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'clock_last'").fetchone()
        return Snapshot(accounts=[accounts[key] for key in sorted(accounts)], clock_last=row[0] if row else None)

    def commit(
        self,
        *,
        accounts: Iterable[tuple[str, str]] = (),
        objects: Iterable[ObjectRow] = (),
        counters: Iterable[tuple[str, str, int]] = (),
        clock_last: str | None = None,
    ) -> None:
        """Write accounts (id, token digest), objects, id counters and the clock, atomically."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT INTO accounts (account_id, token_sha256) VALUES (?, ?) "
                    "ON CONFLICT (account_id) DO UPDATE SET token_sha256 = excluded.token_sha256",
                    list(accounts),
                )
                self._conn.executemany(
                    "INSERT INTO objects (account_id, kind, object_id, data, deleted) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (account_id, kind, object_id) "
                    "DO UPDATE SET data = excluded.data, deleted = excluded.deleted",
                    [(row.account_id, row.kind, row.object_id, _json(row.data), int(row.deleted)) for row in objects],
                )
                self._conn.executemany(
                    "INSERT INTO counters (account_id, kind, issued) VALUES (?, ?, ?) "
                    "ON CONFLICT (account_id, kind) DO UPDATE SET issued = excluded.issued",
                    list(counters),
                )
                if clock_last is not None:
                    self._conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('clock_last', ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (clock_last,),
                    )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
