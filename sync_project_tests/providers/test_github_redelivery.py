"""Redelivery of failed GitHub webhook deliveries, end to end on loopback.

GitHub never retries a delivery we failed to take (a 5xx while the database was down, a deploy),
so a poll asks GitHub to redeliver them. The fake here is shaped like GitHub's documented REST
endpoints (``GET /repos/{owner}/{repo}/hooks/{hook_id}/deliveries``, newest first, ``cursor``
pagination in the ``Link`` header; ``POST .../deliveries/{delivery_id}/attempts`` answering 202),
and a redelivery is a real signed POST to the real receiver, which stores it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sync_project.core import FetchContext
from sync_project.providers import github
from sync_project.receiver import create_app
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project.syncs import github_issues
from sync_project_tests.providers._support import fixture_bytes

SECRET = "github-redelivery-secret"
TOKEN = "ghp_redelivery_test_token"
TOKEN_ENV = "SYNC_TEST_GITHUB_REDELIVERY_TOKEN"
HOOK_ID = 42
LOG = logging.getLogger("sync_project_tests.redelivery")


@dataclass
class Attempt:
    id: int
    guid: str
    delivered_at: datetime
    status_code: int
    redelivery: bool = False
    event: str = "issues"
    action: str | None = "opened"

    def as_github_lists_it(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "guid": self.guid,
            "delivered_at": self.delivered_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "redelivery": self.redelivery,
            "duration": 0.27,
            "status": "OK" if 200 <= self.status_code < 300 else "Service Unavailable",
            "status_code": self.status_code,
            "event": self.event,
            "action": self.action,
            "installation_id": None,
            "repository_id": 1296269,
            "throttled_at": None,
        }


@dataclass
class FakeGitHub:
    """The hook's delivery log and the endpoints that read it and redeliver from it."""

    receiver_url: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    payloads: dict[str, bytes] = field(default_factory=dict)
    redeliver_requests: list[int] = field(default_factory=list)
    deliveries_status: int = 200
    next_id: int = 1000

    def add(
        self, guid: str, status_code: int, *, age: timedelta = timedelta(minutes=5), redelivery: bool = False
    ) -> Attempt:
        self.next_id += 1
        attempt = Attempt(self.next_id, guid, datetime.now(timezone.utc) - age, status_code, redelivery)
        self.attempts.append(attempt)
        self.payloads.setdefault(guid, fixture_bytes("github/webhook_issues_opened.json"))
        return attempt

    def app(self) -> Starlette:
        prefix = f"/repos/octocat/Hello-World/hooks/{HOOK_ID}"
        return Starlette(
            routes=[
                Route(f"{prefix}/deliveries", self.list_deliveries, methods=["GET"]),
                Route(prefix + "/deliveries/{delivery_id:int}/attempts", self.redeliver, methods=["POST"]),
                Route("/repos/octocat/Hello-World/issues", self.issues, methods=["GET"]),
                Route("/repos/octocat/Hello-World/issues/comments", self.no_comments, methods=["GET"]),
            ]
        )

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {TOKEN}"

    async def list_deliveries(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"message": "Requires authentication"}, status_code=401)
        if self.deliveries_status != 200:
            return JSONResponse(
                {"message": "Resource not accessible by personal access token"}, status_code=self.deliveries_status
            )
        per_page = min(int(request.query_params.get("per_page", "30")), 100)
        newest_first = sorted(self.attempts, key=lambda a: a.id, reverse=True)
        cursor = request.query_params.get("cursor")
        if cursor:  # GitHub's cursors are opaque; this one names the attempt to continue after
            newest_first = [a for a in newest_first if a.id < int(cursor.removeprefix("v1_"))]
        page, rest = newest_first[:per_page], newest_first[per_page:]
        headers = {}
        if rest:
            headers["link"] = (
                f'<{request.url.replace(query=f"per_page={per_page}&cursor=v1_{page[-1].id}")}>; rel="next"'
            )
        return JSONResponse([a.as_github_lists_it() for a in page], headers=headers)

    async def redeliver(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"message": "Requires authentication"}, status_code=401)
        delivery_id = request.path_params["delivery_id"]
        original = next((a for a in self.attempts if a.id == delivery_id), None)
        if original is None:
            return JSONResponse({"message": "Not Found"}, status_code=404)
        self.redeliver_requests.append(delivery_id)
        body = self.payloads[original.guid]
        headers = {
            "x-github-delivery": original.guid,
            "x-github-event": original.event,
            "x-hub-signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
            "content-type": "application/json",
        }
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(f"{self.receiver_url}/webhooks/github", content=body, headers=headers)
            status = answer.status_code
        except httpx.TransportError:
            status = 0  # what GitHub lists when it got no answer
        self.next_id += 1
        self.attempts.append(Attempt(self.next_id, original.guid, datetime.now(timezone.utc), status, True))
        return JSONResponse({}, status_code=202)

    async def no_comments(self, request: Request) -> Response:
        return JSONResponse([])

    async def issues(self, request: Request) -> Response:
        return JSONResponse([], headers={"date": datetime.now(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")})


@dataclass
class Setup:
    fake: FakeGitHub
    store: Store
    connection: Any

    def poll(self, checkpoint: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """One incremental poll of github/issues, as a run does it; its last checkpoint."""
        with github.PROVIDER.client(self.connection) as client:
            ctx = FetchContext(
                client=client, connection=self.connection, mode="incremental", checkpoint=checkpoint, log=LOG
            )
            pages = list(github_issues.fetch(ctx))
        return pages[-1].checkpoint

    def stored_guids(self) -> list[str]:
        return sorted(e.event_key for e in self.store.inbox.events())


@pytest.fixture
def setup(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    monkeypatch.setenv("SYNC_GITHUB_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    fake = FakeGitHub()
    receiver_app = create_app(store, providers={"github": github.PROVIDER}, syncs=[github_issues.issues])
    with BackgroundServer(receiver_app, lifespan="on") as receiver, BackgroundServer(fake.app()) as api:
        fake.receiver_url = receiver.url
        connection = store.connections.add(
            "github",
            "hello",
            account_id="octocat/Hello-World",
            credentials_env=TOKEN_ENV,
            config={"hook_id": HOOK_ID, "base_url": api.url},
        )
        yield Setup(fake, store, connection)


def test_failed_deliveries_are_redelivered_once_each_and_stored(setup: Setup) -> None:
    fake = setup.fake
    fake.add("guid-ok", 202)
    unavailable = fake.add("guid-503", 503)
    timed_out = fake.add("guid-timeout", 0)  # GitHub got no answer at all
    fake.add("guid-retried", 500, age=timedelta(minutes=30))
    fake.add("guid-retried", 500, age=timedelta(minutes=20), redelivery=True)  # already asked for once
    fake.add("guid-too-old", 502, age=timedelta(days=3, hours=1))  # GitHub no longer redelivers it

    checkpoint = setup.poll()
    assert sorted(fake.redeliver_requests) == [unavailable.id, timed_out.id]
    assert setup.stored_guids() == ["guid-503", "guid-timeout"]
    assert checkpoint is not None and "deliveries_checked_at" in checkpoint

    # The next poll sees the redeliveries in the list and asks for nothing again.
    setup.poll(checkpoint)
    assert sorted(fake.redeliver_requests) == [unavailable.id, timed_out.id]


def test_a_redelivery_that_failed_again_is_not_asked_for_a_second_time(setup: Setup) -> None:
    setup.fake.add("guid-503", 503)
    setup.fake.receiver_url = "http://127.0.0.1:9"  # the receiver is down again when GitHub redelivers
    setup.poll()
    setup.poll()
    assert len(setup.fake.redeliver_requests) == 1
    assert setup.stored_guids() == []


def test_the_delivery_list_is_read_page_by_page_back_to_the_window(setup: Setup) -> None:
    failed = setup.fake.add("guid-old-failure", 503, age=timedelta(hours=2))
    for n in range(250):  # newer successes push the failure to the list's third page
        setup.fake.add(f"guid-{n}", 202, age=timedelta(minutes=1))
    setup.poll()
    assert setup.fake.redeliver_requests == [failed.id]
    assert setup.stored_guids() == ["guid-old-failure"]


def test_without_permission_to_read_deliveries_the_poll_still_runs(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.fake.add("guid-503", 503)
    setup.fake.deliveries_status = 403
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        checkpoint = setup.poll({"since": "2026-01-01T00:00:00Z"})
    assert setup.fake.redeliver_requests == []
    assert checkpoint is None or "deliveries_checked_at" not in checkpoint
    assert any(
        "redelivery of failed webhooks skipped" in r.getMessage() and "HTTP 403" in r.getMessage()
        for r in caplog.records
    )


def test_a_connection_without_a_hook_id_checks_no_deliveries(setup: Setup) -> None:
    setup.fake.add("guid-503", 503)
    connection = setup.store.connections.add(
        "github",
        "no-hook",
        account_id="octocat/Hello-World",
        credentials_env=TOKEN_ENV,
        config={"base_url": setup.connection.config["base_url"]},
    )
    Setup(setup.fake, setup.store, connection).poll()
    assert setup.fake.redeliver_requests == []


def test_deliveries_are_parsed_from_githubs_documented_shape() -> None:
    listed = Attempt(12345678, "0b989ba4-242f-11e5-81e1-c7b6966d2516", datetime(2019, 6, 3, tzinfo=timezone.utc), 502)
    parsed = github.HookDelivery.model_validate(json.loads(json.dumps(listed.as_github_lists_it())))
    assert (parsed.id, parsed.guid, parsed.succeeded, parsed.redelivery) == (12345678, listed.guid, False, False)
