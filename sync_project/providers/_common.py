"""What the real provider modules share: the provider's clock, JSON intake, and
walking a list sorted by modification time without skipping records that change meanwhile.

The module name starts with ``_`` so the registry, which imports every provider module, skips it.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from sync_project.core.http import ProviderError
from sync_project.core.provider import MalformedWebhookError

Sleep = Callable[[float], None]
ModelT = TypeVar("ModelT", bound=BaseModel)


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


def load_json(body: bytes) -> Any:
    """A webhook body as JSON, or :class:`MalformedWebhookError` saying why not."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedWebhookError(f"body is not JSON: {error}") from None


def epoch_time(value: int, where: str, *, millis: bool = False) -> datetime:
    """A provider's Unix timestamp (seconds, or milliseconds) as a datetime, or
    :class:`MalformedWebhookError` (HTTP 400) when it is outside what a datetime holds: a verified
    delivery that can never be stored. Even the division by 1000 overflows for a huge integer."""
    try:
        return datetime.fromtimestamp(value / 1000 if millis else value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise MalformedWebhookError(f"{where} is not a timestamp between the years 1 and 9999") from None


def parse_records(model: type[ModelT], items: Iterable[Any], where: str) -> list[ModelT]:
    """Validate provider objects into ``model``; a shape we cannot read fails with its place named."""
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as error:
            raise ProviderError(f"{where}: item #{index} is not a {model.__name__}: {error}") from None
    return parsed


@dataclass(frozen=True)
class ListPage:
    """One page of a list sorted by modification time, ascending."""

    items: list[dict[str, Any]]
    #: The provider's token for the next page of the same query (a Link URL, an offset), if any.
    next_cursor: str | None
    server_time: datetime | None


def walk_modified(
    fetch_page: Callable[[datetime | None, str | None], ListPage],
    modified_at: Callable[[dict[str, Any]], datetime],
    since: datetime | None,
    *,
    overlap: timedelta = timedelta(0),
    lag: timedelta = timedelta(0),
) -> Iterator[tuple[list[dict[str, Any]], datetime | None]]:
    """Yield ``(items, resume_at)`` per page of a list sorted by modification time.

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
        resume_at = _resume_at(since, newest, overlap, lag, page.server_time)
        yield page.items, resume_at
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
