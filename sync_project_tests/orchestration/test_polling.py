"""``poll`` itself, on both store backends: one page fetched ahead, pages committed in order.

The asset tests (test_polling_assets.py) poll a real HTTP API through Dagster; these drive
``poll`` with an in-memory source, to observe exactly when each page is requested relative to
the transactions of the pages before it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import httpx
import pytest
from pydantic import BaseModel

from sync_project.core import FetchContext, Page, SyncDefinition
from sync_project.orchestration.polling import poll
from sync_project.store import InvalidBatchError, ProviderConnection, Store

CONNECTION = "acme"
PAGES = 5
PER_PAGE = 3
LOG = logging.getLogger(__name__)


class Item(BaseModel):
    id: str
    updated_at: str


def page(number: int) -> Page:
    records = [{"id": f"p{number}-{n}", "updated_at": f"2026-01-0{number}T00:00:00Z"} for n in range(PER_PAGE)]
    return Page(records=records, checkpoint={"page": number})


class Source:
    """Pages from memory; notes, for each page it is asked for, how many pages had committed."""

    def __init__(self, pages: list[Page], *, fail_on: int | None = None) -> None:
        self.pages = pages
        self.fail_on = fail_on
        self.committed = 0
        self.committed_when_requested: list[int] = []
        self.page_two_requested = threading.Event()

    def fetch(self, ctx: FetchContext) -> Iterator[Page]:
        for number, item in enumerate(self.pages, start=1):
            self.committed_when_requested.append(self.committed)
            if number == 2:
                self.page_two_requested.set()
            if number == self.fail_on:
                raise httpx.ConnectError("provider went away")
            yield item


@pytest.fixture
def connection() -> ProviderConnection:
    now = datetime.now(timezone.utc)
    return ProviderConnection(provider="memory", connection_id=CONNECTION, created_at=now, updated_at=now)


def definition(source: Source) -> SyncDefinition:
    return SyncDefinition(provider="memory", name="items", model=Item, fetch=source.fetch, updated_field="updated_at")


def observe_commits(store: Store, source: Source, monkeypatch: pytest.MonkeyPatch, *, hold_first: bool = False) -> None:
    """Count the source's committed pages; optionally keep page 1's transaction open until page 2
    has been requested (which only a poll that fetches ahead can do)."""
    writer = store.writer

    @contextmanager
    def counting_writer(*args, **kwargs):
        with writer(*args, **kwargs) as opened:
            if hold_first and source.committed == 0:
                assert source.page_two_requested.wait(timeout=30), "page 2 was not requested during page 1"
            yield opened
        source.committed += 1

    monkeypatch.setattr(store, "writer", counting_writer)


def run_poll(store: Store, source: Source, connection: ProviderConnection) -> object:
    with httpx.Client() as client:
        return poll(store, definition(source), connection, client, LOG, mode="incremental", run_id="run-1")


def test_the_next_page_is_fetched_while_the_current_one_commits(store, connection, monkeypatch):
    source = Source([page(n) for n in range(1, PAGES + 1)])
    observe_commits(store, source, monkeypatch, hold_first=True)

    result = run_poll(store, source, connection)

    assert result.pages == PAGES and result.merge.added == PAGES * PER_PAGE
    # Page 2 is requested while page 1's transaction is open (held until then). Page n is never
    # requested before page n-2 committed: at most one page waits in memory beside the one being
    # written. Whether the fetch thread asks for page n before or after page n-1 commits is up
    # to the scheduler, so either count is right.
    requested = source.committed_when_requested
    assert requested[:2] == [0, 0]
    assert all(
        number - 2 <= committed <= number - 1 for number, committed in enumerate(requested, start=1) if number > 2
    ), requested
    assert store.count("memory/items", CONNECTION) == PAGES * PER_PAGE
    assert store.state.get("memory/items", CONNECTION).checkpoint == {"page": PAGES}


def test_a_fetch_error_surfaces_after_every_earlier_page_committed(store, connection, monkeypatch):
    source = Source([page(n) for n in range(1, PAGES + 1)], fail_on=3)
    observe_commits(store, source, monkeypatch)

    with pytest.raises(httpx.ConnectError, match="provider went away"):
        run_poll(store, source, connection)

    assert source.committed == 2
    assert store.count("memory/items", CONNECTION) == 2 * PER_PAGE
    assert store.state.get("memory/items", CONNECTION).checkpoint == {"page": 2}


def test_a_bad_record_fails_its_page_after_the_earlier_pages_committed(store, connection, monkeypatch):
    bad = page(2)
    bad.records.append({"updated_at": "2026-01-02T00:00:00Z"})  # no id
    source = Source([page(1), bad, page(3)])
    observe_commits(store, source, monkeypatch)

    with pytest.raises(InvalidBatchError, match="no usable primary key"):
        run_poll(store, source, connection)

    assert source.committed == 1
    assert store.count("memory/items", CONNECTION) == PER_PAGE
    assert store.state.get("memory/items", CONNECTION).checkpoint == {"page": 1}
