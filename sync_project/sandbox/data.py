"""The sandbox's CRM: accounts with their contacts and deals, in memory behind one lock, and
optionally written through to a :class:`~sync_project.sandbox.persistence.SandboxJournal`.

Every change takes a timestamp from one :class:`MonotonicClock` while holding the lock, so
``updated_at`` strictly increases in the order changes become visible. That is what lets a poller
page by ``(updated_at, id)`` with ``updated_after`` and never miss a change: a record that changes
while someone pages moves to the end of the order, where the pager will still find it.

With a journal, each call's changes are committed before their webhooks are queued: a webhook
never announces a change that a restarted sandbox would not have.
"""

from __future__ import annotations

import bisect
import json
import random
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from sync_project.sandbox import fake
from sync_project.sandbox.fake import ChangeMix, Operation
from sync_project.sandbox.persistence import ObjectRow, SandboxJournal, token_digest

ObjectKind = Literal["contacts", "deals"]
KINDS: tuple[ObjectKind, ...] = ("contacts", "deals")
SINGULAR: dict[ObjectKind, str] = {"contacts": "contact", "deals": "deal"}
ID_PREFIX: dict[ObjectKind, str] = {"contacts": "con_", "deals": "deal_"}
#: Sorts after any id, so ``(timestamp, ID_MAX)`` is "everything at that timestamp".
ID_MAX = "\U0010ffff"
_ACCOUNT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ONE_US = timedelta(microseconds=1)
_NEVER = datetime.min.replace(tzinfo=timezone.utc)


class SandboxError(ValueError):
    """A request the sandbox refuses; the message says why."""


class UnknownAccountError(SandboxError):
    pass


class ConflictError(SandboxError):
    pass


def format_timestamp(value: datetime) -> str:
    """ISO-8601 UTC with exactly six fractional digits and ``Z``: fixed width, so text order is time order."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """An ISO-8601 timestamp; one without an offset is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SandboxError(f"not an ISO-8601 timestamp: {text[:60]!r}") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class MonotonicClock:
    """UTC timestamps that strictly increase, even when the wall clock stalls or steps back.

    Whole seconds are skipped (microsecond 0), so every timestamp prints with six fractional digits,
    exactly as pydantic prints it back: a record synced through a model compares equal as text.
    Not thread-safe by itself: :class:`SandboxState` calls it under its lock.
    """

    def __init__(self, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self._now = now
        self._last = _NEVER

    def resume_after(self, value: datetime) -> None:
        """Hand out only timestamps after ``value`` (the newest one a previous run issued)."""
        self._last = max(self._last, value)

    @property
    def last(self) -> datetime:
        return self._last

    def next(self) -> datetime:
        candidate = max(self._now(), self._last + _ONE_US)
        if candidate.microsecond == 0:
            candidate += _ONE_US
        self._last = candidate
        return candidate


@dataclass(frozen=True)
class ChangeEvent:
    """One change, as its webhook announces it."""

    id: str
    type: str
    account_id: str
    occurred_at: str
    #: The object after the change; for a delete its last state plus ``"deleted": true``.
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "account_id": self.account_id,
            "occurred_at": self.occurred_at,
            "data": self.data,
        }

    def body(self) -> bytes:
        return json.dumps(self.as_dict(), separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class _Collection:
    """One object kind of one account: live objects, their (updated_at, id) order, and the deleted."""

    live: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: int = 0

    def put(self, obj: dict[str, Any]) -> None:
        previous = self.live.get(obj["id"])
        if previous is not None:
            self._unorder(previous)
        self.live[obj["id"]] = obj
        bisect.insort(self.order, (obj["updated_at"], obj["id"]))

    def remove(self, object_id: str) -> dict[str, Any]:
        obj = self.live.pop(object_id)
        self._unorder(obj)
        self.deleted[object_id] = obj
        return obj

    def _unorder(self, obj: dict[str, Any]) -> None:
        index = bisect.bisect_left(self.order, (obj["updated_at"], obj["id"]))
        del self.order[index]


@dataclass
class Account:
    account_id: str
    #: Known only in the process that created or last set it: the journal keeps a digest.
    token: str | None
    collections: dict[ObjectKind, _Collection] = field(default_factory=lambda: {k: _Collection() for k in KINDS})


@dataclass(frozen=True)
class ListResult:
    items: list[dict[str, Any]]
    #: ``(updated_at, id)`` of the last item when more follow, else None.
    resume_after: tuple[str, str] | None


class SandboxState:
    """All accounts and their data; every public method is atomic under one lock.

    ``on_change`` is called with every :class:`ChangeEvent`, still under the lock, so webhooks are
    queued in the order the changes happened (after the journal committed them, with one).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        clock: MonotonicClock | None = None,
        on_change: Callable[[ChangeEvent], None] | None = None,
        journal: SandboxJournal | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self._rng = random.Random(seed)
        self._clock = clock or MonotonicClock()
        self._accounts: dict[str, Account] = {}
        #: SHA-256 digest of a token -> its account.
        self._by_token: dict[str, str] = {}
        self.on_change = on_change
        self._journal = journal
        # What the call in progress changed (nested calls join the outermost one).
        self._depth = 0
        self._dirty_objects: set[tuple[str, ObjectKind, str]] = set()
        self._dirty_accounts: set[str] = set()
        self._queued: list[ChangeEvent] = []
        self._digests: dict[str, str] = {}
        if journal is not None:
            self._restore(journal)

    @property
    def persistent(self) -> bool:
        return self._journal is not None

    def _restore(self, journal: SandboxJournal) -> None:
        snapshot = journal.load()
        for stored in snapshot.accounts:
            account = Account(stored.account_id, None)
            for kind in KINDS:
                saved = stored.collections.get(kind)
                if saved is None:
                    continue
                collection = account.collections[kind]
                for obj in saved.live.values():
                    collection.put(obj)
                collection.deleted.update(saved.deleted)
                collection.issued = saved.issued
            self._accounts[account.account_id] = account
            self._by_token[stored.token_sha256] = account.account_id
            self._digests[account.account_id] = stored.token_sha256
        if snapshot.clock_last is not None:
            self._clock.resume_after(parse_timestamp(snapshot.clock_last))

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One call's changes: journalled together, then announced, all under the lock."""
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._flush()

    def _flush(self) -> None:
        events, self._queued = self._queued, []
        objects, self._dirty_objects = self._dirty_objects, set()
        accounts, self._dirty_accounts = self._dirty_accounts, set()
        if self._journal is not None and (objects or accounts):
            rows = []
            for account_id, kind, object_id in sorted(objects):
                collection = self._accounts[account_id].collections[kind]
                live = collection.live.get(object_id)
                data = live if live is not None else collection.deleted[object_id]
                rows.append(ObjectRow(account_id, kind, object_id, data, live is None))
            self._journal.commit(
                accounts=[(a, self._digests[a]) for a in sorted(accounts)],
                objects=rows,
                counters=sorted({(a, k, self._accounts[a].collections[k].issued) for a, k, _ in objects}),
                clock_last=format_timestamp(self._clock.last) if self._clock.last > _NEVER else None,
            )
        if self.on_change is not None:
            for event in events:
                self.on_change(event)

    def _touch(self, account: Account, kind: ObjectKind, object_id: str) -> None:
        self._dirty_objects.add((account.account_id, kind, object_id))

    # -- accounts -------------------------------------------------------------------------------

    def create_account(
        self, account_id: str | None = None, token: str | None = None, *, contacts: int = 0, deals: int = 0
    ) -> Account:
        """A new account, seeded with existing data (no webhooks: it predates the subscription)."""
        if contacts < 0 or deals < 0:
            raise SandboxError("contacts and deals must be >= 0")
        _check_token(token)
        with self._changing():
            if account_id is None:
                number = len(self._accounts) + 1
                while f"acct-{number}" in self._accounts:
                    number += 1
                account_id = f"acct-{number}"
            if not _ACCOUNT_ID.match(account_id):
                raise SandboxError(f"account id {account_id[:80]!r} must match {_ACCOUNT_ID.pattern}")
            if account_id in self._accounts:
                raise ConflictError(f"account {account_id!r} already exists")
            token = token or "sbx_" + secrets.token_urlsafe(24)
            digest = token_digest(token)
            if digest in self._by_token:
                raise ConflictError("that token is already in use by another account")
            account = Account(account_id, token)
            self._accounts[account_id] = account
            self._by_token[digest] = account_id
            self._digests[account_id] = digest
            self._dirty_accounts.add(account_id)
            for _ in range(contacts):
                self._insert(account, "contacts")
            for _ in range(deals):
                self._insert(account, "deals")
            return account

    def set_token(self, account_id: str, token: str | None = None) -> str:
        """Give ``account_id`` a new API token (generated when not given); the old one stops working."""
        _check_token(token)
        with self._changing():
            account = self._account(account_id)
            token = token or "sbx_" + secrets.token_urlsafe(24)
            digest = token_digest(token)
            holder = self._by_token.get(digest)
            if holder is not None and holder != account_id:
                raise ConflictError("that token is already in use by another account")
            self._by_token.pop(self._digests[account_id], None)
            self._by_token[digest] = account_id
            self._digests[account_id] = digest
            account.token = token
            self._dirty_accounts.add(account_id)
            return token

    def account_for_token(self, token: str) -> str | None:
        digest = token_digest(token)
        with self.lock:
            return self._by_token.get(digest)

    def account_ids(self) -> list[str]:
        with self.lock:
            return sorted(self._accounts)

    def counts(self, account_id: str) -> dict[str, int]:
        with self.lock:
            account = self._account(account_id)
            return {kind: len(account.collections[kind].live) for kind in KINDS}

    # -- reads ----------------------------------------------------------------------------------

    def page(
        self,
        account_id: str,
        kind: ObjectKind,
        *,
        limit: int,
        updated_after: datetime | None = None,
        after: tuple[str, str] | None = None,
    ) -> ListResult:
        """Live objects in ``(updated_at, id)`` order, strictly after both given positions."""
        with self.lock:
            collection = self._account(account_id).collections[kind]
            start = 0
            if updated_after is not None:
                start = bisect.bisect_right(collection.order, (format_timestamp(updated_after), ID_MAX))
            if after is not None:
                start = max(start, bisect.bisect_right(collection.order, after))
            keys = collection.order[start : start + limit + 1]
            items = [dict(collection.live[object_id]) for _, object_id in keys[:limit]]
            resume = keys[limit - 1] if len(keys) > limit else None
            return ListResult(items, resume)

    def get(self, account_id: str, kind: ObjectKind, object_id: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self._account(account_id).collections[kind].live.get(object_id)
            return None if obj is None else dict(obj)

    def truth(self, account_id: str) -> dict[str, Any]:
        """Everything live, as the API returns it, plus the ids deleted so far."""
        with self.lock:
            account = self._account(account_id)
            result: dict[str, Any] = {"account_id": account_id}
            for kind in KINDS:
                collection = account.collections[kind]
                result[kind] = [dict(collection.live[i]) for i in sorted(collection.live)]
            result["deleted"] = {kind: sorted(account.collections[kind].deleted) for kind in KINDS}
            return result

    # -- changes --------------------------------------------------------------------------------

    def create(self, account_id: str, kind: ObjectKind) -> ChangeEvent:
        with self._changing():
            return self._create(self._account(account_id), kind)

    def update(self, account_id: str, kind: ObjectKind, object_id: str) -> ChangeEvent:
        with self._changing():
            account = self._account(account_id)
            obj = account.collections[kind].live.get(object_id)
            if obj is None:
                raise SandboxError(f"no live {SINGULAR[kind]} {object_id!r} in {account_id!r}")
            changes = fake.contact_changes(self._rng, obj) if kind == "contacts" else fake.deal_changes(self._rng, obj)
            updated = {**obj, **changes, "updated_at": format_timestamp(self._clock.next())}
            account.collections[kind].put(updated)
            self._touch(account, kind, object_id)
            return self._emit(account, kind, "updated", updated, updated["updated_at"])

    def delete(self, account_id: str, kind: ObjectKind, object_id: str) -> ChangeEvent:
        with self._changing():
            account = self._account(account_id)
            if object_id not in account.collections[kind].live:
                raise SandboxError(f"no live {SINGULAR[kind]} {object_id!r} in {account_id!r}")
            last = account.collections[kind].remove(object_id)
            self._touch(account, kind, object_id)
            # The deletion happens after the last update, so its time orders after it too.
            occurred_at = format_timestamp(self._clock.next())
            return self._emit(account, kind, "deleted", {**last, "deleted": True}, occurred_at)

    def apply_random(
        self, count: int, *, mix: ChangeMix | None = None, account_ids: Iterable[str] | None = None
    ) -> list[ChangeEvent]:
        """``count`` random creates, updates and deletes, spread over ``account_ids`` (default: all)."""
        mix = mix or ChangeMix()
        with self._changing():
            targets = sorted(set(account_ids)) if account_ids is not None else sorted(self._accounts)
            for account_id in targets:
                self._account(account_id)
            if not targets:
                raise SandboxError("there is no account to change; create one first")
            events = []
            for _ in range(count):
                account = self._accounts[self._rng.choice(targets)]
                kind: ObjectKind = "deals" if self._rng.random() < mix.deal_share else "contacts"
                events.append(self._random_change(account, kind, mix.pick_operation(self._rng)))
            return events

    def _random_change(self, account: Account, kind: ObjectKind, operation: Operation) -> ChangeEvent:
        live = account.collections[kind].live
        if operation == "created" or not live:
            return self._create(account, kind)
        object_id = self._rng.choice(sorted(live))
        if operation == "updated":
            return self.update(account.account_id, kind, object_id)
        return self.delete(account.account_id, kind, object_id)

    def _create(self, account: Account, kind: ObjectKind) -> ChangeEvent:
        obj = self._insert(account, kind)
        return self._emit(account, kind, "created", obj, obj["updated_at"])

    def _insert(self, account: Account, kind: ObjectKind) -> dict[str, Any]:
        collection = account.collections[kind]
        collection.issued += 1
        object_id = f"{ID_PREFIX[kind]}{collection.issued:06d}"
        if kind == "contacts":
            fields = fake.contact_fields(self._rng, collection.issued)
        else:
            contacts = account.collections["contacts"].live
            contact_id = self._rng.choice(sorted(contacts)) if contacts else None
            fields = fake.deal_fields(self._rng, collection.issued, contact_id)
        stamp = format_timestamp(self._clock.next())
        obj = {"id": object_id, **fields, "updated_at": stamp, "created_at": stamp}
        collection.put(obj)
        self._touch(account, kind, object_id)
        return obj

    def _emit(
        self, account: Account, kind: ObjectKind, operation: Operation, data: dict[str, Any], occurred_at: str
    ) -> ChangeEvent:
        event = ChangeEvent(
            # Random, not seeded: a restarted sandbox must never reuse an id a receiver has deduped.
            id=f"evt_{uuid.uuid4().hex}",
            type=f"{SINGULAR[kind]}.{operation}",
            account_id=account.account_id,
            occurred_at=occurred_at,
            data=dict(data),
        )
        self._queued.append(event)  # announced once the call's changes are journalled
        return event

    def _account(self, account_id: str) -> Account:
        try:
            return self._accounts[account_id]
        except KeyError:
            raise UnknownAccountError(f"unknown account {account_id!r}") from None


def _check_token(token: str | None) -> None:
    if token is not None and (len(token) < 8 or any(ch.isspace() for ch in token)):
        raise SandboxError("token must be at least 8 characters without whitespace")
