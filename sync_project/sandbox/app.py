"""The sandbox's HTTP API (Starlette): the CRM API under /v1 and the control panel under /admin.

/v1 (bearer token of an account; the token decides the account; rate limited per token):
  GET /v1/account                                      -> {"account_id"}
  GET /v1/{contacts|deals}?updated_after=&limit=&cursor= -> {"results", "next_cursor", "has_more"}
  GET /v1/{contacts|deals}/{id}                        -> the object; 404 once deleted

Lists are ordered by ``(updated_at, id)``; ``updated_after`` is exclusive; ``next_cursor`` is null on
the last page. Deleted objects are not listed (pollers find deletes by full refresh; webhooks say
``*.deleted``).

/admin (``Authorization: Bearer <admin token>``; a second credential so a demo can hand out
account tokens without handing out control): accounts, changes, generator, chaos, rate-limit,
webhook, truth, deliveries, flush. See each handler.

Errors are JSON ``{"error": <code>, "message": <why>}``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync_project.sandbox.chaos import ChaosSettings
from sync_project.sandbox.data import (
    KINDS,
    SINGULAR,
    ConflictError,
    ObjectKind,
    SandboxError,
    UnknownAccountError,
    parse_timestamp,
)
from sync_project.sandbox.fake import ChangeMix
from sync_project.sandbox.generator import GeneratorSettings
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.service import AccountSpec, Sandbox
from sync_project.sandbox.webhooks import DeliveriesPausedError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
MAX_CHANGES_PER_CALL = 10_000
M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ChangesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(default=1, ge=1, le=MAX_CHANGES_PER_CALL)
    account_id: str | None = None
    mix: ChangeMix = Field(default_factory=ChangeMix)


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = None


# -- cursors ------------------------------------------------------------------------------------


def encode_cursor(kind: ObjectKind, position: tuple[str, str]) -> str:
    raw = json.dumps([kind, *position], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(kind: ObjectKind, cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        cursor_kind, updated_at, object_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ApiError(400, "invalid_cursor", "cursor is not one this API issued") from None
    if cursor_kind != kind or not isinstance(updated_at, str) or not isinstance(object_id, str):
        raise ApiError(400, "invalid_cursor", f"cursor was not issued by the {kind} list")
    return updated_at, object_id


# -- helpers ------------------------------------------------------------------------------------


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>", {"www-authenticate": "Bearer"})
    return token.strip()


def _sandbox(request: Request) -> Sandbox:
    return cast(Sandbox, request.app.state.sandbox)


def _account(request: Request) -> str:
    """The account of the request's token, after charging the token's rate limit."""
    sandbox = _sandbox(request)
    token = _bearer(request)
    account_id = sandbox.state.account_for_token(token)
    if account_id is None:
        raise ApiError(401, "unauthorized", "unknown API token", {"www-authenticate": "Bearer"})
    wait_s = sandbox.rate_limiter.acquire(token)
    if wait_s is not None:
        raise ApiError(429, "rate_limited", f"rate limit exceeded; retry in {wait_s} s", {"retry-after": str(wait_s)})
    return account_id


def _admin(request: Request) -> Sandbox:
    sandbox = _sandbox(request)
    if not hmac.compare_digest(_bearer(request).encode(), sandbox.admin_token.encode()):
        raise ApiError(401, "unauthorized", "wrong admin token", {"www-authenticate": "Bearer"})
    return sandbox


def _kind(request: Request) -> ObjectKind:
    kind = request.path_params["kind"]
    if kind not in KINDS:
        raise ApiError(404, "not_found", f"no such object type {kind!r}; known: {', '.join(KINDS)}")
    return cast(ObjectKind, kind)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name} must be an integer, got {text[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{name} must be between {low} and {high}, got {value}")
    return value


def _validation_message(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


async def _body(request: Request, model: type[M], current: BaseModel | None = None) -> M:
    """The JSON body as ``model``; fields left out keep their ``current`` values."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "request body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "request body must be a JSON object")
    if current is not None:
        data = {**current.model_dump(), **data}
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, "invalid_request", _validation_message(error)) from None


def _json(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


# -- /v1 ----------------------------------------------------------------------------------------


async def whoami(request: Request) -> Response:
    return JSONResponse({"account_id": _account(request)})


async def list_objects(request: Request) -> Response:
    account_id = _account(request)
    kind = _kind(request)
    limit = _int_param(request, "limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
    updated_after = None
    if (text := request.query_params.get("updated_after")) is not None:
        try:
            updated_after = parse_timestamp(text)
        except SandboxError as error:
            raise ApiError(400, "invalid_request", f"updated_after: {error}") from None
    cursor = request.query_params.get("cursor")
    after = decode_cursor(kind, cursor) if cursor else None
    page = _sandbox(request).state.page(account_id, kind, limit=limit, updated_after=updated_after, after=after)
    next_cursor = encode_cursor(kind, page.resume_after) if page.resume_after else None
    return JSONResponse({"results": page.items, "next_cursor": next_cursor, "has_more": next_cursor is not None})


async def get_object(request: Request) -> Response:
    account_id = _account(request)
    kind = _kind(request)
    object_id = request.path_params["object_id"]
    obj = _sandbox(request).state.get(account_id, kind, object_id)
    if obj is None:
        raise ApiError(404, "not_found", f"no {SINGULAR[kind]} {object_id!r}")
    return JSONResponse(obj)


# -- /admin -------------------------------------------------------------------------------------


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def create_account(request: Request) -> Response:
    """POST {account_id?, token?, contacts?, deals?} -> 201 {account_id, token}."""
    sandbox = _admin(request)
    spec = await _body(request, AccountSpec)
    account = await run_in_threadpool(
        sandbox.state.create_account, spec.account_id, spec.token, contacts=spec.contacts, deals=spec.deals
    )
    return JSONResponse({"account_id": account.account_id, "token": account.token}, status_code=201)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str | None = Field(default=None, repr=False)


async def set_account_token(request: Request) -> Response:
    """POST {token?} -> 200 {account_id, token}: the account's new API token (the old one stops
    working). A sandbox restarted from its data file keeps only digests of tokens: this is how an
    account it kept gets a token somebody knows."""
    sandbox = _admin(request)
    ask = await _body(request, TokenRequest)
    account_id = request.path_params["account_id"]
    token = await run_in_threadpool(sandbox.state.set_token, account_id, ask.token)
    return JSONResponse({"account_id": account_id, "token": token})


async def list_accounts(request: Request) -> Response:
    state = _admin(request).state
    return JSONResponse({"accounts": [{"account_id": a, **state.counts(a)} for a in state.account_ids()]})


async def apply_changes(request: Request) -> Response:
    """POST {count, account_id?, mix?}: apply random changes now; their webhooks are queued."""
    sandbox = _admin(request)
    ask = await _body(request, ChangesRequest)
    accounts = [ask.account_id] if ask.account_id else None
    events = await run_in_threadpool(sandbox.state.apply_random, ask.count, mix=ask.mix, account_ids=accounts)
    return JSONResponse(
        {
            "events": [
                {
                    "id": e.id,
                    "type": e.type,
                    "account_id": e.account_id,
                    "object_id": e.data["id"],
                    "occurred_at": e.occurred_at,
                }
                for e in events
            ]
        }
    )


async def generator(request: Request) -> Response:
    """GET the generator's status; POST {running?, rate_per_s?, mix?, account_ids?} to change it."""
    sandbox = _admin(request)
    if request.method == "POST":
        settings = await _body(request, GeneratorSettings, sandbox.generator.status().settings)
        return _json(sandbox.generator.configure(settings))
    return _json(sandbox.generator.status())


async def chaos(request: Request) -> Response:
    """GET the chaos knobs; POST {drop_pct?, duplicate_pct?, delay_s?, paused?} to turn them."""
    sandbox = _admin(request)
    if request.method == "POST":
        sandbox.deliveries.set_chaos(await _body(request, ChaosSettings, sandbox.deliveries.chaos.settings))
    return _json(sandbox.deliveries.chaos.settings)


async def rate_limit(request: Request) -> Response:
    """GET the rate limit; POST {enabled?, rate_per_s?, burst?} to change it (buckets refill)."""
    sandbox = _admin(request)
    if request.method == "POST":
        sandbox.rate_limiter.configure(await _body(request, RateLimitSettings, sandbox.rate_limiter.settings))
    return _json(sandbox.rate_limiter.settings)


async def webhook(request: Request) -> Response:
    """GET the webhook URL; POST {url} to subscribe (null unsubscribes)."""
    sandbox = _admin(request)
    if request.method == "POST":
        sandbox.deliveries.set_url((await _body(request, WebhookSettings)).url)
    return _json(WebhookSettings(url=sandbox.deliveries.url))


async def truth(request: Request) -> Response:
    """GET ?account_id=: every live contact and deal exactly as the API lists them, and deleted ids."""
    sandbox = _admin(request)
    account_id = request.query_params.get("account_id")
    if not account_id:
        raise ApiError(400, "invalid_request", "account_id is required")
    return JSONResponse(sandbox.state.truth(account_id))


async def deliveries(request: Request) -> Response:
    """GET counts: events, sent, dropped, duplicated, failed, pending, attempts, retries."""
    return _json(_admin(request).deliveries.counts())


async def flush(request: Request) -> Response:
    """POST ?timeout_s=: wait until no delivery is queued or in flight (504 on timeout, 409 if paused)."""
    sandbox = _admin(request)
    timeout_s = _int_param(request, "timeout_s", 30, 0, 600)
    try:
        drained = await run_in_threadpool(sandbox.deliveries.flush, timeout_s)
    except DeliveriesPausedError as error:
        raise ApiError(409, "paused", str(error)) from None
    counts = sandbox.deliveries.counts()
    if not drained:
        raise ApiError(504, "timeout", f"{counts.pending} deliveries still pending after {timeout_s} s")
    return _json(counts)


# -- error mapping ------------------------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    error = cast(ApiError, exc)
    return _error(error.status, error.code, error.message, error.headers)


async def _sandbox_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, UnknownAccountError):
        return _error(404, "not_found", str(exc))
    if isinstance(exc, ConflictError):
        return _error(409, "conflict", str(exc))
    return _error(400, "invalid_request", str(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    error = cast(HTTPException, exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "error")
    return _error(error.status_code, code, str(error.detail), cast(Any, error.headers))


def create_app(sandbox: Sandbox) -> Starlette:
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/account", whoami),
            Route("/v1/{kind}", list_objects),
            Route("/v1/{kind}/{object_id}", get_object),
            Route("/admin/accounts", create_account, methods=["POST"]),
            Route("/admin/accounts", list_accounts, methods=["GET"]),
            Route("/admin/accounts/{account_id}/token", set_account_token, methods=["POST"]),
            Route("/admin/changes", apply_changes, methods=["POST"]),
            Route("/admin/generator", generator, methods=["GET", "POST"]),
            Route("/admin/chaos", chaos, methods=["GET", "POST"]),
            Route("/admin/rate-limit", rate_limit, methods=["GET", "POST"]),
            Route("/admin/webhook", webhook, methods=["GET", "POST"]),
            Route("/admin/truth", truth),
            Route("/admin/deliveries", deliveries),
            Route("/admin/flush", flush, methods=["POST"]),
        ],
        exception_handlers={ApiError: _api_error, SandboxError: _sandbox_error, HTTPException: _http_error},
    )
    app.state.sandbox = sandbox
    return app
