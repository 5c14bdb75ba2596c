"""How provider APIs page, once: a cursor, a ``Link`` header, an offset, or a time window.

A provider module says how to ask for one page (``fetch_page``) and picks the walk its API
documents; the walk owns the loop, its end and its safety checks. Each yields :class:`ListPage`
objects as they arrive, so a sync turns each into one :class:`~sync_project.core.Page` and
checkpoints after it (a run killed after page k resumes at page k+1).

- :func:`cursor_pages`: the answer names the next page (``next_cursor``, ``starting_after`` the
  last id, ``paging.next.after``); stop when it names none.
- :func:`link_pages`: the same, the token being the ``Link: <...>; rel="next"`` URL (RFC 8288).
- :func:`offset_pages`: the request names where to start (``offset=``, ``skip=``); a short page
  is the last one.
- :func:`time_window_pages`: a list sorted by modification time, re-queried from the newest
  timestamp seen after each page, so records modified while we page are never skipped.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from sync_project.core.http import ProviderError

if TYPE_CHECKING:
    import httpx

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class ListPage:
    """One page as the provider answered it."""

    items: list[dict[str, Any]] = field(default_factory=list)
    #: The provider's token for the next page (a cursor, a ``Link`` URL, an offset); None on the last.
    next_cursor: str | None = None
    #: The provider's clock when it answered (its ``Date`` header), for checkpoints on that clock.
    server_time: datetime | None = None


def cursor_pages(fetch_page: Callable[[str | None], ListPage], cursor: str | None = None) -> Iterator[ListPage]:
    """Follow the provider's next-page token from ``cursor`` (None: the first page) until it has none.

    A provider that answers with the token it was asked with would loop forever: that is an error
    naming the token, not a hang.
    """
    while True:
        page = fetch_page(cursor)
        yield page
        if page.next_cursor is None:
            return
        if page.next_cursor == cursor:
            raise ProviderError(f"the provider answered page {cursor!r} with the same next-page token")
        cursor = page.next_cursor


def next_link(response: httpx.Response) -> str | None:
    """The ``rel="next"`` URL of a response's ``Link`` header, if any."""
    url = response.links.get("next", {}).get("url")
    return str(url) if url else None


def link_pages(
    client: httpx.Client,
    path: str,
    params: Mapping[str, Any],
    items: Callable[[httpx.Response], list[dict[str, Any]]],
) -> Iterator[ListPage]:
    """``GET path?params``, then each ``Link: rel="next"`` URL (which carries the query itself)
    until a response has none. ``items`` reads one response's list (and raises on a bad shape)."""

    def fetch_page(url: str | None) -> ListPage:
        response = client.get(url) if url else client.get(path, params=dict(params))
        return ListPage(items(response), next_link(response), server_time(response))

    return cursor_pages(fetch_page)


def offset_pages(fetch_page: Callable[[int], ListPage], page_size: int, offset: int = 0) -> Iterator[ListPage]:
    """Pages from ``offset`` on, each starting after the items read so far; a page shorter than
    ``page_size`` (or empty) is the last. Offsets over a list that changes while we page skip or
    repeat records: use it for lists in a stable order, else :func:`time_window_pages`."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    while True:
        page = fetch_page(offset)
        yield page
        if len(page.items) < page_size:
            return
        offset += len(page.items)


def time_window_pages(
    fetch_page: Callable[[datetime | None, str | None], ListPage],
    modified_at: Callable[[dict[str, Any]], datetime],
    since: datetime | None,
    *,
    overlap: timedelta = timedelta(0),
    lag: timedelta = timedelta(0),
) -> Iterator[tuple[ListPage, datetime | None]]:
    """Yield ``(page, resume_at)`` per page of a list sorted by modification time, ascending.

    Offset pagination (page numbers, ``after`` offsets) over a list sorted by modification time
    skips records: one modified while we page moves to the end, and everything behind it shifts
    one place towards pages already read. So after each page the query restarts from the newest
    timestamp seen (``fetch_page(anchor, None)``); every record not yet read is modified at or
    after it, so none is skipped, and the few at the boundary are read twice (harmless: merges are
    idempotent). The provider's next-page token is followed only when a whole page shares one
    timestamp and restarting would not move. This also keeps HubSpot's 10,000-result cap per query
    out of reach.

    ``overlap`` widens each restart for a ``since`` filter whose inclusiveness is not documented
    (GitHub's) or whose timestamps are truncated. ``resume_at``, the checkpoint a later run starts
    from, also stays ``lag`` behind the provider's clock: search indexes and read replicas show a
    change a little after its timestamp, and a cursor that had already passed it would miss it.
    """
    anchor = since
    cursor: str | None = None
    newest: datetime | None = None
    while True:
        page = fetch_page(anchor, cursor)
        for item in page.items:
            stamp = modified_at(item)
            newest = stamp if newest is None or stamp > newest else newest
        yield page, _resume_at(since, newest, overlap, lag, page.server_time)
        if page.next_cursor is None:
            return
        restart = None if newest is None else newest - overlap
        if restart is not None and (anchor is None or restart > anchor):
            anchor, cursor = restart, None
        else:
            cursor = page.next_cursor


def _resume_at(
    since: datetime | None,
    newest: datetime | None,
    overlap: timedelta,
    lag: timedelta,
    now: datetime | None,
) -> datetime | None:
    if newest is None:
        return since
    resume = newest - overlap
    horizon = (now or datetime.now(timezone.utc)) - lag
    resume = min(resume, horizon)
    # Never behind where this run started: that would only re-read what it already had.
    return resume if since is None else max(resume, since)


def server_time(response: httpx.Response) -> datetime | None:
    """The provider's clock, from the ``Date`` header: comparing the provider's timestamps with
    our own clock would carry the skew between the two machines into every cursor."""
    value = response.headers.get("date")
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def parse_records(model: type[ModelT], items: Iterable[Any], where: str) -> list[ModelT]:
    """Validate provider objects into ``model``; a shape we cannot read fails with its place named."""
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as error:
            raise ProviderError(f"{where}: item #{index} is not a {model.__name__}: {error}") from None
    return parsed
