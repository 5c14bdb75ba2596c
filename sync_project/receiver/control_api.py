"""The control API on the receiver service: what the application that embeds the syncs asks of them.

====================================================  ==========================================
``POST /syncs/{provider}/{object}/trigger``           queue a poll: ``{"connection", "mode"}``,
                                                      mode ``incremental`` (default) or
                                                      ``full_refresh``
``POST /syncs/{provider}/{object}/pause``             pause the connection: ``{"connection"}``
``POST /syncs/{provider}/{object}/resume``            resume it: ``{"connection"}``
``GET /syncs/{provider}/{object}/status?connection=``  last run and its counts, last error,
                                                      checkpoint, webhook backlog, next poll
====================================================  ==========================================

A trigger is a run submitted to the Dagster instance (:class:`~sync_project.orchestration.control.RunLauncher`)
with the job, partition, run config and tags a schedule's poll has, so it queues behind the same
one-poll-per-partition limit and has the same maximum run time. Pause and resume are the
connection's (``sync-project connections pause``): every sync of that connection stops, as a
connection is one set of credentials at one account. Status is what ``sync-project connections
status`` computes for the one partition (:func:`~sync_project.cli.connection_status.partition_statuses`).

Authentication: ``Authorization: Bearer <token>`` with a scoped token (:mod:`~sync_project.receiver.tokens`)
whose scopes include ``control:*``, ``control:PROVIDER`` or ``control:PROVIDER/CONNECTION``;
read scopes (the records API's) do not control anything.

====  =========================================================================================
200   done: the queued run, the connection's new status, or the partition's status
400   a malformed body or parameter (the answer says which)
401   no bearer token, or a wrong one
403   the token may not control this provider or connection (decided before the database is read)
404   no such sync, or no such connection of its provider
409   trigger only: a run holds the partition's poll lease, a poll of it is queued or running, or the
      connection is paused
503   the database or the Dagster instance is unavailable, or no control token is configured
====  =========================================================================================

Checks run in this order: token (401), sync (404), body or parameters (400), scope (403),
connection (404), then the partition's state (409), as the records API's do.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sync_project.core.sync import SyncDefinition
from sync_project.receiver.tokens import ApiToken, bearer
from sync_project.store import Store, StoreUnavailableError, UnknownConnectionError

if TYPE_CHECKING:  # importing it loads Dagster: only a receiver with the API on pays for that
    from sync_project.orchestration.control import RunLauncher

log = logging.getLogger("sync_project.receiver.control")

#: A control request's body is a connection id and a mode: a few hundred bytes.
MAX_BODY_BYTES = 16 * 1024
#: The API's modes, and the run modes they become.
MODES = {"incremental": "incremental", "full_refresh": "full"}


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class _ConnectionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connection: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")


class _TriggerBody(_ConnectionBody):
    mode: Literal["incremental", "full_refresh"] = "incremental"


def control_routes(
    store: Store,
    *,
    syncs: Sequence[SyncDefinition],
    tokens: Sequence[ApiToken],
    launcher: Callable[[], RunLauncher] | None,
    retry_after_s: int = 5,
) -> list[Route]:
    """The control API's routes. ``launcher`` gives the Dagster side (a :class:`LazyLauncher`);
    without it, or without a token that controls anything, every route answers 503 and the
    start-up log says why."""
    known = {sync.key: sync for sync in syncs}
    enabled = launcher is not None and any(token.controls_anything for token in tokens)
    if not enabled:
        log.info("control API off: no token has a control: scope (SYNC_RECORDS_API_TOKENS, e.g. tok=control:*)")
    unavailable = {"Retry-After": str(retry_after_s)}
    # One trigger at a time in this process, so two triggers of one partition cannot both find it
    # free; across receivers, the run queue's one-poll-per-partition limit holds them in turn.
    trigger_lock = threading.Lock()
    dagster = launcher or _no_launcher

    def authorize(request: Request) -> tuple[SyncDefinition, ApiToken]:
        """The token (401) and the sync (404), before the request's body or parameters are read."""
        if not enabled:
            raise _Refused(503, "the control API is not enabled on this receiver")
        token = bearer(request.headers.get("authorization", ""), tokens)
        if token is None:
            raise _Refused(401, "a valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="control"'})
        key = f"{request.path_params['provider']}/{request.path_params['object']}"
        sync = known.get(key)
        if sync is None:
            raise _Refused(404, f"no sync {key[:120]!r}")
        return sync, token

    def in_scope(sync: SyncDefinition, token: ApiToken, connection_id: str) -> None:
        """403 unless the token controls the connection: decided from the request alone."""
        if not token.allows(sync.provider, connection_id, control=True):
            log.info("control: token %s refused %s connection %r (out of scope)", token.name, sync.key, connection_id)
            raise _Refused(403, f"this token may not control {sync.provider} connection {connection_id!r}")

    async def body_of(request: Request, model: type[_ConnectionBody]) -> _ConnectionBody:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise _Refused(413, f"body over {MAX_BODY_BYTES} bytes")
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
            raise _Refused(400, f"invalid body: {problems}"[:300]) from None

    def endpoint(
        handler: Callable[[Request], Any],
    ) -> Callable[[Request], Any]:
        async def answer(request: Request) -> Response:
            try:
                return _json(200, await handler(request))
            except _Refused as refused:
                return _json(refused.status, {"error": str(refused)}, refused.headers)
            except UnknownConnectionError as error:
                return _json(404, {"error": str(error)})
            except StoreUnavailableError:
                return _json(503, {"error": "records database unavailable, retry later"}, unavailable)
            except Exception as error:  # noqa: BLE001 - the Dagster instance's storage failing
                log.warning("control: %s %s failed: %s", request.method, request.url.path, type(error).__name__)
                return _json(503, {"error": "the Dagster instance is unavailable, retry later"}, unavailable)

        return answer

    @endpoint
    async def trigger(request: Request) -> dict[str, Any]:
        sync, token = authorize(request)
        body = cast(_TriggerBody, await body_of(request, _TriggerBody))
        in_scope(sync, token, body.connection)
        mode = MODES[body.mode]

        def submit() -> dict[str, Any]:
            connection = store.connections.get(sync.provider, body.connection)
            if connection.status != "active":
                raise _Refused(409, f"connection {body.connection!r} is {connection.status}; resume it first")
            from sync_project.orchestration.control import PartitionBusyError

            with trigger_lock:
                holder = store.leases.live_holder(sync.key, body.connection, "poll")
                if holder is not None:
                    raise _Refused(409, f"run {holder} holds the poll lease of {sync.key} for {body.connection!r}")
                try:
                    run = dagster().submit_poll(sync, body.connection, mode)  # type: ignore[arg-type]
                except PartitionBusyError as error:
                    raise _Refused(409, str(error)) from None
            log.info(
                "control: token %s triggered %s for %r (%s): run %s",
                token.name,
                sync.key,
                body.connection,
                mode,
                run.run_id,
            )
            return {
                "run_id": run.run_id,
                "status": run.status.value,
                "sync": sync.key,
                "connection": body.connection,
                "mode": body.mode,
                "tags": dict(run.tags),
            }

        return await run_in_threadpool(submit)

    def set_status(status: Literal["active", "paused"]) -> Callable[[Request], Any]:
        async def change(request: Request) -> dict[str, Any]:
            sync, token = authorize(request)
            body = await body_of(request, _ConnectionBody)
            in_scope(sync, token, body.connection)

            def apply() -> dict[str, Any]:
                store.connections.set_status(sync.provider, body.connection, status)
                log.info("control: token %s set %s/%s %s", token.name, sync.provider, body.connection, status)
                return {
                    "provider": sync.provider,
                    "connection": body.connection,
                    "status": status,
                    # A connection's status is every one of its syncs'.
                    "syncs": sorted(key for key, s in known.items() if s.provider == sync.provider),
                }

            return await run_in_threadpool(apply)

        return change

    @endpoint
    async def status(request: Request) -> dict[str, Any]:
        sync, token = authorize(request)
        params = request.query_params
        unknown = sorted(set(params) - {"connection"})
        if unknown:
            raise _Refused(400, f"unknown parameter(s) {', '.join(unknown)[:200]}; accepted: connection")
        if len(params.getlist("connection")) != 1:
            raise _Refused(400, "the connection parameter is required, once")
        try:
            connection_id = _ConnectionBody(connection=params["connection"]).connection
        except ValidationError:
            raise _Refused(400, "connection must be 1 to 255 characters without control characters") from None
        in_scope(sync, token, connection_id)

        def read() -> dict[str, Any]:
            from sync_project.cli.connection_status import partition_statuses

            connection = store.connections.get(sync.provider, connection_id)
            plane = dagster()
            [found] = partition_statuses(store, plane.instance, plane.defs, [sync], [connection])
            poll_run = plane.unfinished_poll(sync, connection_id)
            return {
                **found.model_dump(mode="json"),
                "poll_lease_holder": store.leases.live_holder(sync.key, connection_id, "poll"),
                "queued_or_running_poll": poll_run.run_id if poll_run is not None else None,
            }

        return await run_in_threadpool(read)

    return [
        Route("/syncs/{provider}/{object}/trigger", trigger, methods=["POST"]),
        Route("/syncs/{provider}/{object}/pause", endpoint(set_status("paused")), methods=["POST"]),
        Route("/syncs/{provider}/{object}/resume", endpoint(set_status("active")), methods=["POST"]),
        Route("/syncs/{provider}/{object}/status", status, methods=["GET"]),
    ]


class LazyLauncher:
    """Opens the Dagster side at the first request that needs it (the receiver starts, and takes
    webhooks, while the instance's storage is still coming up), and closes it with the app."""

    def __init__(self, open_launcher: Callable[[], RunLauncher]) -> None:
        self._open = open_launcher
        self._lock = threading.Lock()
        self._launcher: RunLauncher | None = None

    def __call__(self) -> RunLauncher:
        with self._lock:
            if self._launcher is None:
                self._launcher = self._open()
            return self._launcher

    def close(self) -> None:
        with self._lock:
            if self._launcher is not None:
                self._launcher.close()
                self._launcher = None


def _no_launcher() -> RunLauncher:
    raise _Refused(503, "the control API is not enabled on this receiver")


def _json(status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    # ASCII-escaped: a message quoting the request may hold what UTF-8 cannot encode.
    return Response(
        json.dumps(content, default=str), status_code=status, headers=headers, media_type="application/json"
    )
