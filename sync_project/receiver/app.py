"""The webhook receiver: verify a delivery, route it, commit it to the inbox, then answer.

``POST /webhooks/{provider}`` answers only after the delivery is committed, so a 2xx means the
events are durable; anything else makes a retrying provider send it again, and nothing is lost.

====  =========================================================================================
202   stored (at least one new inbox row)
200   nothing new: every event was already stored (a redelivery), or the delivery held no events
400   malformed: unreadable body or events (after the signature verified)
401   missing or bad signature (or outside the scheme's time tolerance); nothing stored
404   unknown provider
413   body over ``max_body_bytes`` (default 1 MiB), by Content-Length or while streaming
500   the provider's webhook secret is not configured: the answer and the log name the variable.
      A 5xx, not a 401, because providers that retry (HubSpot does not retry a 401) then keep the
      delivery until an operator sets the secret.
503   the database is unavailable, does not answer within the commit deadline (default 5 s), has
      not been reached since the receiver started, the write queue is full, or the receiver is
      shutting down; with ``Retry-After``
====  =========================================================================================

``GET /healthz`` answers 200 ``{"database": "ok"}`` when the inbox table can be read, else 503
``{"database": "unavailable", "reason": ...}``; within the commit deadline either way.

Database faults end in a bounded answer. A delivery is answered 2xx only after its own commit; a
database that does not answer at all (frozen: no error, no timeout fires) gets the delivery a 503
at the deadline, and the ones after it a 503 at once (see :mod:`~sync_project.receiver.batching`).
The receiver starts while its database is down and takes deliveries once it is back (see
:mod:`~sync_project.receiver.database`).

Every delivery logs one JSON line (logger ``sync_project.receiver``): provider, event count and
keys, status code, outcome, duration. Never the body, never a header, never a secret.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync_project import settings
from sync_project.core.provider import (
    MalformedWebhookError,
    Provider,
    SignatureError,
    WebhookRequest,
)
from sync_project.core.sync import SyncDefinition
from sync_project.receiver.batching import CommitterClosedError, GroupCommitter, QueueFullError
from sync_project.receiver.database import DatabaseGate
from sync_project.receiver.records_api import records_routes
from sync_project.receiver.routing import registry_subscribers, subscribers_from
from sync_project.receiver.writer import Delivery, InboxWriter
from sync_project.store import Store
from sync_project.store.errors import StoreUnavailableError
from sync_project.store.inbox import ReceiveResult

DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Event keys written into one log line; a HubSpot batch can hold hundreds.
LOGGED_KEYS = 20

log = logging.getLogger("sync_project.receiver")


class _BodyTooLarge(Exception):
    pass


class _JsonLine:
    """A delivery's log fields, serialised only if a handler renders the plain message.

    :class:`~sync_project.receiver.logs.JsonFormatter` reads ``fields`` directly, so the event
    loop does not pay for a JSON encoding nobody reads.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return json.dumps(self.fields)


def create_app(
    store: Store,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    providers: Mapping[str, Provider] | None = None,
    syncs: Sequence[SyncDefinition] | None = None,
    max_batch: int = 1000,
    max_queue: int = 10_000,
    writers: int = 1,
    retry_after_s: int = 5,
    commit_deadline_s: float | None = None,
) -> Starlette:
    """The receiver app over ``store``.

    ``providers`` and ``syncs`` default to the registry (every module in ``sync_project.providers``
    and ``sync_project.syncs``); pass them to serve an explicit set. ``max_batch`` bounds one group
    commit, ``max_queue`` the deliveries waiting for one (beyond it: 503). ``writers`` > 1 overlaps
    commits (each writer thread has its own connection); on this 2-core machine it measured no
    faster, and two batches racing over the same events can then deadlock on Postgres, which fails
    one of them with 503 for the provider to retry. ``commit_deadline_s`` (default
    ``SYNC_RECEIVER_COMMIT_DEADLINE_S`` or 5 s) bounds the wait for a commit and for ``/healthz``.

    ``store`` need not be reachable yet, nor migrated: open it with ``migrate_schema=False`` and
    the receiver migrates it once the database answers, answering 503 until then.
    """
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be positive")
    if providers is None:
        from sync_project import registry

        providers = registry.providers()
    known = dict(providers)
    subscribers = subscribers_from(syncs) if syncs is not None else registry_subscribers

    deadline_s = settings.commit_deadline_s() if commit_deadline_s is None else commit_deadline_s
    if deadline_s <= 0:
        raise ValueError("commit_deadline_s must be positive")
    writer = InboxWriter(store, subscribers)
    committer: GroupCommitter[Delivery, ReceiveResult] = GroupCommitter(
        writer, max_batch=max_batch, max_queue=max_queue, writers=writers, deadline_s=deadline_s
    )
    database = DatabaseGate(store, deadline_s=deadline_s, stalled_for=committer.stalled_for)
    unavailable_headers = {"Retry-After": str(retry_after_s)}

    async def receive_webhook(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["provider"]
        entry: dict[str, Any] = {"provider": name}

        def answer(status: int, outcome: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
            entry.update(status=status, outcome=outcome, duration_ms=round((time.perf_counter() - started) * 1000, 3))
            if status >= 400 and "error" in body:
                entry["error"] = body["error"]
            log.log(logging.WARNING if status >= 500 else logging.INFO, "%s", _JsonLine(entry), extra={"fields": entry})
            return JSONResponse({"outcome": outcome, **body}, status_code=status, headers=headers)

        provider = known.get(name)
        if provider is None:
            return answer(404, "unknown_provider", {"error": f"unknown provider {name!r}"})
        try:
            body = await _read_body(request, max_body_bytes)
        except _BodyTooLarge:
            return answer(
                413, "too_large", {"error": f"body over {max_body_bytes} bytes"}, {"Connection": "close"}
            )
        except ValueError as error:
            return answer(400, "malformed", {"error": str(error)})
        except ClientDisconnect:
            return answer(499, "client_disconnected", {})
        entry["bytes"] = len(body)
        secrets = provider.webhook_secrets()
        if not secrets:
            variable = provider.webhook_secret_env or "(none declared by the provider)"
            return answer(
                500,
                "secret_not_configured",
                {"error": f"webhook secret for {name!r} is not configured: set the environment variable {variable}"},
            )
        webhook = WebhookRequest(
            method=request.method,
            url=str(request.url),
            headers=dict(request.headers.items()),
            body=body,
            received_at=datetime.now(timezone.utc),
        )
        try:
            provider.verify(webhook, secrets)
        except SignatureError as error:
            return answer(401, "bad_signature", {"error": str(error) or "bad signature"})
        try:
            events = provider.parse(webhook)
        except (MalformedWebhookError, ValueError) as error:  # ValueError covers bad JSON and UTF-8
            return answer(400, "malformed", {"error": str(error) or type(error).__name__})
        except Exception as error:  # noqa: BLE001 - a provider bug: 5xx so the provider retries
            # Where, not what: the exception's text may quote the body it choked on.
            log.error("provider %s failed to parse a verified delivery: %s", name, _where(error))
            return answer(500, "parse_failed", {"error": f"{type(error).__name__} while parsing"})
        keys = [str(e.event_key) for e in events]
        entry.update(events=len(keys), event_keys=keys[:LOGGED_KEYS])
        if len(keys) > LOGGED_KEYS:
            entry["event_keys_truncated"] = True
        if not events:
            return answer(200, "no_events", {"stored": 0, "duplicates": 0})
        if not database.ready:
            entry["reason"] = "DatabaseNotReached"
            return answer(503, "unavailable", {"error": "inbox unavailable, retry later"}, unavailable_headers)
        try:
            result = await committer.submit(Delivery(name, tuple(events)))
        except MalformedWebhookError as error:
            return answer(400, "malformed", {"error": str(error)})
        except (StoreUnavailableError, QueueFullError, CommitterClosedError) as error:
            entry["reason"] = type(error).__name__
            return answer(503, "unavailable", {"error": "inbox unavailable, retry later"}, unavailable_headers)
        except Exception as error:  # noqa: BLE001 - answered 500 so the provider retries
            # The type only: a database error's text quotes the statement's parameters (the body).
            entry["reason"] = type(error).__name__
            return answer(500, "store_failed", {"error": "could not store the delivery"})
        entry.update(stored=result.stored, duplicates=result.duplicates)
        body_out = {"stored": result.stored, "duplicates": result.duplicates}
        if result.stored:
            return answer(202, "stored", body_out)
        return answer(200, "duplicate", body_out)

    async def healthz(_request: Request) -> Response:
        reason = await database.unavailable()
        if reason is None:
            return JSONResponse({"database": "ok"})
        log.warning("health check: database unavailable: %s", reason)
        return JSONResponse({"database": "unavailable", "reason": reason}, status_code=503, headers=unavailable_headers)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await database.start()  # waits for the database at most the deadline
        await committer.start()
        try:
            yield
        finally:
            await committer.stop()  # bounded by the deadline: every waiting request has its answer by then
            writer.close()
            await database.stop()

    app = Starlette(
        routes=[
            Route("/webhooks/{provider}", receive_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            *records_routes(store, syncs=syncs),
        ],
        lifespan=lifespan,
    )
    app.state.committer = committer
    app.state.database = database
    return app


def _where(error: BaseException) -> str:
    """The exception's type and the innermost frame that raised it, without its message."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return type(error).__name__
    last = frames[-1]
    return f"{type(error).__name__} at {last.filename}:{last.lineno} in {last.name}"


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing early (Content-Length) or mid-stream once it exceeds ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ValueError(f"invalid Content-Length {declared[:40]!r}") from None
        if length > limit:
            raise _BodyTooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge
    return bytes(body)

