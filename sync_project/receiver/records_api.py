"""The records API on the receiver service: a sync's change feed over HTTP, for the customer's app.

``GET /records/{provider}/{object}?connection=...`` answers one page of
:meth:`Store.changes <sync_project.store.store.Store.changes>`, ordered by
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

Authentication: ``Authorization: Bearer <token>``, compared in constant time with the tokens in
``SYNC_RECORDS_API_TOKEN`` (several, comma-separated, to rotate one without downtime), read when
the app is created.

====  =========================================================================================
200   a page
400   a bad or unknown parameter (the answer says which); nothing else is attempted
401   no bearer token, or a wrong one (``WWW-Authenticate: Bearer``)
404   no such sync, or no such connection of its provider
503   the database is unavailable (``Retry-After``), or no token is configured: the API is off
      until ``SYNC_RECORDS_API_TOKEN`` is set, and says so (a 5xx because it is the service's
      configuration that is missing, not the client's credentials)
====  =========================================================================================

The database read and the JSON encoding run in a worker thread, so a 10,000-record page never
holds the event loop that receives webhooks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync_project.core.sync import SyncDefinition
from sync_project.providers.signing import matches_any
from sync_project.store import Store
from sync_project.store.errors import StoreUnavailableError, UnknownConnectionError
from sync_project.store.feed import MAX_PAGE, ChangeAction, InvalidCursorError

TOKEN_ENV = "SYNC_RECORDS_API_TOKEN"
DEFAULT_LIMIT = 100
PARAMETERS = ("connection", "cursor", "limit", "filter", "modified_after")
ACTIONS: tuple[ChangeAction, ...] = ("added", "updated", "deleted")


class _BadRequest(ValueError):
    pass


def configured_tokens(environ: dict[str, str] | None = None) -> list[str]:
    """The accepted tokens: ``SYNC_RECORDS_API_TOKEN`` split on commas and whitespace."""
    raw = (os.environ if environ is None else environ).get(TOKEN_ENV, "")
    return [token for token in re.split(r"[,\s]+", raw) if token]


def records_routes(
    store: Store,
    *,
    syncs: Sequence[SyncDefinition] | None = None,
    tokens: Sequence[str] | None = None,
    retry_after_s: int = 5,
) -> list[Route]:
    """The API's routes, for ``create_app`` to mount. ``syncs`` defaults to the registry's,
    ``tokens`` to :func:`configured_tokens`."""
    if syncs is None:
        from sync_project import registry

        syncs = registry.syncs()
    known = {sync.key: sync for sync in syncs}
    accepted = list(configured_tokens() if tokens is None else tokens)

    async def list_records(request: Request) -> Response:
        if not accepted:
            return _error(503, f"the records API is off: set {TOKEN_ENV} on the receiver to enable it")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip() or not matches_any(given.strip(), accepted):
            return _error(401, "a valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="records"'})
        sync = known.get(f"{request.path_params['provider']}/{request.path_params['object']}")
        if sync is None:
            return _error(404, f"no sync {request.path_params['provider']}/{request.path_params['object']}")
        try:
            query = _parse(request)
        except _BadRequest as error:
            return _error(400, str(error))
        try:
            return await run_in_threadpool(_page, store, sync, **query)
        except UnknownConnectionError:
            return _error(404, f"no connection {query['connection_id']!r} of {sync.provider}")
        except (InvalidCursorError, ValueError) as error:
            return _error(400, str(error))
        except StoreUnavailableError:
            return _error(503, "records database unavailable, retry later", {"Retry-After": str(retry_after_s)})

    return [Route("/records/{provider}/{object}", list_records, methods=["GET"])]


def _parse(request: Request) -> dict[str, object]:
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
    limit_text = params.get("limit")
    try:
        limit = DEFAULT_LIMIT if limit_text is None else int(limit_text)
    except ValueError:
        raise _BadRequest(f"limit must be an integer, not {limit_text[:40]!r}") from None
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
    return {
        "connection_id": connection_id,
        "cursor": params.get("cursor") or None,
        "limit": limit,
        "actions": actions,
        "modified_after": modified_after,
    }


def _page(
    store: Store,
    sync: SyncDefinition,
    *,
    connection_id: str,
    cursor: str | None,
    limit: int,
    actions: list[ChangeAction] | None,
    modified_after: datetime | None,
) -> Response:
    store.connections.get(sync.provider, connection_id)
    page = store.changes(
        sync.key, connection_id, cursor=cursor, limit=limit, actions=actions, modified_after=modified_after
    )
    return Response(page.model_dump_json(), media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


__all__ = ["TOKEN_ENV", "configured_tokens", "records_routes"]
