"""The records API on the receiver service: a sync's change feed over HTTP, for the customer's app.

``GET /records/{provider}/{object}?connection=...`` answers one page of
:meth:`Store.changes <sync_project.store.Store.changes>`, ordered by
``(last_modified_at, id)``::

    {"records": [{"id", "connection_id", "data", "last_action", "first_seen_at",
                  "last_modified_at", "source_updated_at", "deleted_at"}, ...],
     "next_cursor": "...", "has_more": false}

Query parameters: ``connection`` (required), ``cursor`` (the previous page's ``next_cursor``),
``limit`` (1..10000, default 100), ``filter`` (comma-separated ``added``, ``updated``,
``deleted``), ``modified_after`` (ISO 8601 with a time zone: a sync notification's
``modified_after``). Paging while records change skips nothing: a record changed after the
consumer passed it comes back on a later page with its new content, so consumers upsert by id.
``next_cursor`` is set on the last page too: keep it and ask again later for what changed since.
A page read with a cursor (or ``modified_after``) from before the connection's records were removed
(``sync-project syncs reset --empty-records --remove``) also carries ``"reset": {"reset_at",
"removed"}``: drop what you hold of the connection, then apply the page.

Authentication: ``Authorization: Bearer <token>``, compared in constant time with the configured
tokens (:mod:`sync_project.receiver.tokens`): ``SYNC_RECORDS_API_TOKEN`` (read everything; several,
comma-separated, to rotate one without downtime), ``SYNC_RECORDS_API_TOKENS`` and
``SYNC_RECORDS_API_TOKENS_FILE`` (each token scoped to providers or connections), read when the app
is created.

Every parameter is validated before the database is asked, the cursor's contents included (its
timestamp must lie between the years 1 and 9999 in UTC, its id be storable text), so no input
reaches the database that it would fail on.

====  =========================================================================================
200   a page
400   a bad or unknown parameter (the answer says which); nothing else is attempted
401   no bearer token, or a wrong one (``WWW-Authenticate: Bearer``)
403   the token's scope does not cover this provider or connection. Decided from the request
      alone, before the database is read, so the answer is the same whether or not the
      connection exists: a 403 tells the holder nothing it did not send (a 404 would have to
      be given for connections that exist too, or it would tell them apart)
404   no such sync, or no such connection of its provider (for a token whose scope covers it)
503   the database is unavailable (``Retry-After``), or no token is configured: the API is off
      until one is (a 5xx because it is the service's configuration that is missing, not the
      client's credentials; the start-up log names the variables, the answer does not)
====  =========================================================================================

Checks run in this order: token (401), sync (404), parameters (400), scope (403), connection (404).

The database read and the JSON encoding run in a worker thread, so a 10,000-record page never
holds the event loop that receives webhooks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sync_project.core.sync import SyncDefinition
from sync_project.receiver.tokens import (
    SCOPED_TOKENS_ENV,
    TOKEN_ENV,
    ApiToken,
    bearer,
    load_tokens,
    tokens_from,
)
from sync_project.store import (
    MAX_PAGE,
    ChangeAction,
    InvalidCursorError,
    Store,
    StoreUnavailableError,
    UnknownConnectionError,
    decode_cursor,
)

DEFAULT_LIMIT = 100
PARAMETERS = ("connection", "cursor", "limit", "filter", "modified_after")
ACTIONS: tuple[ChangeAction, ...] = ("added", "updated", "deleted")
#: A cursor this API hands out is under 100 characters; the bound keeps decoding cheap.
MAX_CURSOR_CHARS = 1024
#: Column sizes of connection ids and record ids.
MAX_ID_CHARS = 255

log = logging.getLogger("sync_project.receiver.records")


class _BadRequest(ValueError):
    pass


def records_routes(
    store: Store,
    *,
    syncs: Sequence[SyncDefinition] | None = None,
    tokens: Sequence[str] | None = None,
    api_tokens: Sequence[ApiToken] | None = None,
    retry_after_s: int = 5,
) -> list[Route]:
    """The API's routes, for ``create_app`` to mount. ``syncs`` defaults to the registry's,
    ``tokens`` (plain tokens that read everything) to the configured ones (:func:`load_tokens`,
    which raises :class:`~sync_project.receiver.tokens.TokenConfigError` on a bad entry);
    ``api_tokens``, tokens already loaded (the app loads them once for this API and the control API)."""
    if syncs is None:
        from sync_project import registry

        syncs = registry.syncs()
    # Every model's records, a sync of several models included (github/issue_comments).
    known = {
        sync.model_key(model.name): (sync, sync.model_key(model.name)) for sync in syncs for model in sync.all_models
    }
    if api_tokens is not None:
        accepted: list[ApiToken] = list(api_tokens)
    else:
        accepted = load_tokens() if tokens is None else tokens_from(tokens)
    if not accepted:
        log.warning("records API off: no token configured (set %s or %s)", TOKEN_ENV, SCOPED_TOKENS_ENV)

    async def list_records(request: Request) -> Response:
        if not accepted:
            # The operator's fix is in the start-up log; an unauthenticated caller learns none of it.
            return _error(503, "the records API is not enabled on this receiver")
        token = bearer(request.headers.get("authorization", ""), accepted)
        if token is None:
            return _error(401, "a valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="records"'})
        key = f"{request.path_params['provider']}/{request.path_params['object']}"
        found = known.get(key)
        if found is None:
            return _error(404, f"no sync {key[:120]!r}")
        sync, records_key = found
        try:
            query = _parse(request)
        except _BadRequest as error:
            return _error(400, str(error))
        if not token.allows(sync.provider, str(query["connection_id"])):
            log.info(
                "records: token %s refused %s connection %r (out of scope)",
                token.name,
                sync.key,
                query["connection_id"],
            )
            return _error(403, f"this token may not read {sync.provider} connection {query['connection_id']!r}")
        try:
            return await run_in_threadpool(_page, store, sync, records_key, **query)
        except UnknownConnectionError:
            return _error(404, f"no connection {query['connection_id']!r} of {sync.provider}")
        except (InvalidCursorError, ValueError) as error:
            return _error(400, str(error))
        except StoreUnavailableError:
            return _error(503, "records database unavailable, retry later", {"Retry-After": str(retry_after_s)})

    return [Route("/records/{provider}/{object}", list_records, methods=["GET"])]


def _parse(request: Request) -> dict[str, Any]:
    params = request.query_params
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise _BadRequest(f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(PARAMETERS)}")
    repeated = sorted(name for name in set(params) if len(params.getlist(name)) > 1)
    if repeated:
        raise _BadRequest(f"parameter(s) given more than once: {', '.join(repeated)}")
    connection_id = params.get("connection", "")
    if not connection_id:
        raise _BadRequest("the connection parameter is required")
    _check_id(connection_id, "connection")
    limit_text = params.get("limit")
    if limit_text is None:
        limit = DEFAULT_LIMIT
    elif limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6:
        limit = int(limit_text)
    else:
        raise _BadRequest(f"limit must be an integer, not {limit_text[:40]!r}")
    if not 1 <= limit <= MAX_PAGE:
        raise _BadRequest(f"limit must be between 1 and {MAX_PAGE}")
    actions: list[ChangeAction] | None = None
    if params.get("filter"):
        names = [name.strip() for name in params["filter"].split(",") if name.strip()]
        wrong = [name for name in names if name not in ACTIONS]
        if wrong or not names:
            raise _BadRequest(f"filter takes {', '.join(ACTIONS)} (comma-separated), not {params['filter'][:80]!r}")
        actions = names  # type: ignore[assignment]
    modified_after = None
    if params.get("modified_after"):
        text = params["modified_after"]
        try:
            modified_after = datetime.fromisoformat(text)
        except ValueError:
            raise _BadRequest(f"modified_after is not an ISO 8601 timestamp: {text[:60]!r}") from None
        if modified_after.tzinfo is None:
            raise _BadRequest("modified_after needs a time zone (e.g. 2026-01-02T03:04:05Z)")
        _check_in_utc_range(modified_after, "modified_after")
    cursor = params.get("cursor") or None
    if cursor is not None:
        _check_cursor(cursor)
    return {
        "connection_id": connection_id,
        "cursor": cursor,
        "limit": limit,
        "actions": actions,
        "modified_after": modified_after,
    }


def _page(
    store: Store,
    sync: SyncDefinition,
    records_key: str,
    *,
    connection_id: str,
    cursor: str | None,
    limit: int,
    actions: list[ChangeAction] | None,
    modified_after: datetime | None,
) -> Response:
    store.connections.get(sync.provider, connection_id)
    page = store.changes(
        records_key, connection_id, cursor=cursor, limit=limit, actions=actions, modified_after=modified_after
    )
    # "reset" only when there was one: a page is otherwise what it always was.
    return Response(
        page.model_dump_json(exclude={"reset"} if page.reset is None else None), media_type="application/json"
    )


def _check_id(value: str, name: str) -> None:
    # The database refuses NUL (Postgres) and nothing it stores is longer: refuse both here.
    if len(value) > MAX_ID_CHARS or any(ord(ch) < 32 for ch in value):
        raise _BadRequest(f"{name} must be at most {MAX_ID_CHARS} characters, without control characters")


def _check_in_utc_range(value: datetime, name: str) -> None:
    # 0001-01-01T00:00:00+14:00 is a valid datetime whose UTC time is in the year 0.
    try:
        value.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise _BadRequest(f"{name} is outside the years 1 to 9999 in UTC") from None


def _check_cursor(cursor: str) -> None:
    """The cursor decoded and its contents checked as a parameter would be: the feed's decoder
    reads any JSON, and the database would then be asked about what it cannot hold."""
    if len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise _BadRequest("invalid cursor: not one this API returned")
    try:
        stamp, key = decode_cursor(cursor)
    except (InvalidCursorError, RecursionError):
        raise _BadRequest("invalid cursor: not one this API returned") from None
    _check_in_utc_range(stamp, "the cursor's timestamp")
    if len(key) > MAX_ID_CHARS or "\x00" in key:
        raise _BadRequest("invalid cursor: its record id is not one the store holds")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadRequest("invalid cursor: its record id is not one the store holds") from None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # ASCII-escaped JSON: a message quoting the request may hold what UTF-8 cannot encode.
    return Response(json.dumps({"error": message}), status_code=status, headers=headers, media_type="application/json")


__all__ = ["TOKEN_ENV", "records_routes"]
