"""The receiver served for real by uvicorn on loopback, on both backends: every answer it gives."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url

from sync_project.core import InboundEvent, WebhookRequest
from sync_project.receiver import create_app
from sync_project.store import Store
from sync_project.store.engine import make_engine
from sync_project_tests.webhook_support import (
    SECRET,
    SECRET_ENV,
    AcmeProvider,
    ServerThread,
    TcpProxy,
    audit_sync,
    body_of,
    contacts_sync,
    event,
    sign,
)

MAX_BODY = 2000


@dataclass
class Receiver:
    url: str
    store: Store
    client: httpx.Client

    def post(self, body: bytes, *, provider: str = "acme", headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(
            f"{self.url}/webhooks/{provider}", content=body, headers=sign(body) if headers is None else headers
        )


def serve(store: Store, **options: Any) -> ServerThread:
    providers = options.pop("providers", {"acme": AcmeProvider()})
    options.setdefault("max_body_bytes", MAX_BODY)
    app = create_app(store, providers=providers, syncs=[contacts_sync(), audit_sync()], **options)
    return ServerThread(app)


@pytest.fixture
def receiver(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    with serve(store) as server, httpx.Client(timeout=10) as client:
        yield Receiver(server.url, store, client)


# -- 2xx ------------------------------------------------------------------------------------------


def test_a_verified_delivery_is_committed_before_the_202(receiver: Receiver) -> None:
    response = receiver.post(body_of(event("evt-1", name="Ada")))
    assert response.status_code == 202
    assert response.json() == {"outcome": "stored", "stored": 1, "duplicates": 0}
    (row,) = receiver.store.inbox.events()
    assert (row.provider, row.event_key, row.sync, row.connection_id, row.status) == (
        "acme",
        "evt-1",
        "acme/contacts",
        "north",
        "pending",
    )
    assert row.payload == {"name": "Ada"}


def test_a_redelivery_answers_200_and_is_stored_once(receiver: Receiver) -> None:
    body = body_of(event("evt-1", name="Ada"))
    assert receiver.post(body).status_code == 202
    again = receiver.post(body)
    assert again.status_code == 200
    assert again.json() == {"outcome": "duplicate", "stored": 0, "duplicates": 1}
    assert receiver.store.inbox.count() == 1


def test_a_batch_delivery_with_one_new_event_is_stored(receiver: Receiver) -> None:
    receiver.post(body_of(event("evt-1")))
    response = receiver.post(body_of(event("evt-1"), event("evt-2", "contact.created")))
    assert response.status_code == 202
    # evt-2 fans out to both subscribed syncs; evt-1 was there already.
    assert response.json() == {"outcome": "stored", "stored": 2, "duplicates": 1}
    assert receiver.store.inbox.count() == 3


def test_an_unroutable_delivery_is_kept_and_replayable_once_the_connection_exists(receiver: Receiver) -> None:
    assert receiver.post(body_of(event("evt-1", account="acct-new"))).status_code == 202
    (row,) = receiver.store.inbox.events()
    assert (row.status, row.connection_id, row.account_id) == ("unroutable", "", "acct-new")
    receiver.store.connections.add("acme", "newco", account_id="acct-new")
    assert receiver.store.inbox.replay("unroutable", connections=receiver.store.connections) == 1
    assert [(e.connection_id, e.status) for e in receiver.store.inbox.events()] == [
        ("", "routed"),
        ("newco", "pending"),
    ]


def test_an_event_no_sync_subscribes_to_is_kept_as_ignored(receiver: Receiver) -> None:
    assert receiver.post(body_of(event("evt-1", "invoice.paid"))).status_code == 202
    assert [(e.status, e.sync) for e in receiver.store.inbox.events()] == [("ignored", "")]


def test_an_empty_batch_is_accepted_with_nothing_stored(receiver: Receiver) -> None:
    response = receiver.post(json.dumps({"events": []}).encode())
    assert (response.status_code, response.json()["outcome"]) == (200, "no_events")
    assert receiver.store.inbox.count() == 0


@pytest.mark.parametrize("writers", [1, 3])
def test_concurrent_deliveries_are_each_answered_after_their_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch, writers: int
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    bodies = [body_of(event(f"evt-{i}")) for i in range(40)]
    # Retries racing each other: the same events, in different orders, in several deliveries.
    racing = [body_of(event("evt-x"), event("evt-y")), body_of(event("evt-y"), event("evt-x"))] * 4

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:

            async def deliver(body: bytes) -> httpx.Response:
                # As a provider does: a 503 (here, two batches deadlocking over the same events,
                # which Postgres resolves by failing one) is sent again.
                for _ in range(5):
                    response = await client.post(f"{url}/webhooks/acme", content=body, headers=sign(body))
                    if response.status_code != 503:
                        break
                return response

            return await asyncio.gather(*(deliver(b) for b in bodies + racing))

    with serve(store, writers=writers) as server:
        responses = asyncio.run(send_all(server.url))
    assert [r.status_code for r in responses[:40]] == [202] * 40
    racing_results = [r.json() for r in responses[40:]]
    assert sum(r["stored"] for r in racing_results) == 2
    assert sum(r["duplicates"] for r in racing_results) == 14
    assert store.inbox.count() == 42


# -- 4xx: nothing stored ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param(sign(b"another body"), id="over-another-body"),
        pytest.param(sign(body_of(event("evt-1")), secret="wrong-secret"), id="wrong-secret"),
        pytest.param({"x-acme-signature": "md5=abc"}, id="wrong-scheme"),
    ],
)
def test_a_bad_or_missing_signature_is_refused_with_401_and_nothing_stored(receiver: Receiver, headers: dict) -> None:
    response = receiver.post(body_of(event("evt-1")), headers=headers)
    assert response.status_code == 401
    assert response.json()["outcome"] == "bad_signature"
    assert receiver.store.inbox.count() == 0


@pytest.mark.parametrize(
    "body, message",
    [
        pytest.param(b"{not json", "Expecting property name", id="not-json"),
        pytest.param(b"\xff\xfe\x00", "decode", id="not-utf8"),
        pytest.param(b"[1, 2]", "neither an event", id="not-an-object"),
        pytest.param(json.dumps({"type": "contact.updated"}).encode(), "lacks an id", id="no-event-id"),
        pytest.param(body_of(event("k" * 300)), "event key is longer than 255", id="event-key-too-long"),
        pytest.param(body_of(event("evt-1", account={"id": 7})), "account id is a dict", id="account-not-text"),
    ],
)
def test_a_malformed_delivery_is_refused_with_400_and_nothing_stored(
    receiver: Receiver, body: bytes, message: str
) -> None:
    response = receiver.post(body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert receiver.store.inbox.count() == 0


def test_one_malformed_delivery_does_not_fail_the_others_committed_with_it(receiver: Receiver) -> None:
    bodies = [body_of(event(f"evt-{i}")) for i in range(10)] + [body_of(event("k" * 300))]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return await asyncio.gather(
                *(client.post(f"{receiver.url}/webhooks/acme", content=b, headers=sign(b)) for b in bodies)
            )

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [202] * 10 + [400]
    assert receiver.store.inbox.count() == 10


def test_an_oversized_body_is_refused_with_413_by_its_content_length(receiver: Receiver) -> None:
    body = body_of(event("evt-1", blob="x" * MAX_BODY))
    response = receiver.post(body)
    assert response.status_code == 413
    assert receiver.store.inbox.count() == 0


def test_an_oversized_body_without_a_length_is_refused_with_413_while_streaming(receiver: Receiver) -> None:
    body = body_of(event("evt-1", blob="x" * MAX_BODY))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 500):
            yield body[start : start + 500]

    response = receiver.client.post(f"{receiver.url}/webhooks/acme", content=chunks(), headers=sign(body))
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert receiver.store.inbox.count() == 0


def test_a_body_at_the_limit_is_accepted(receiver: Receiver) -> None:
    prefix = body_of(event("evt-1", blob=""))
    body = body_of(event("evt-1", blob="x" * (MAX_BODY - len(prefix))))
    assert len(body) == MAX_BODY
    assert receiver.post(body).status_code == 202


def test_an_unknown_provider_is_404(receiver: Receiver) -> None:
    response = receiver.post(body_of(event("evt-1")), provider="nope")
    assert response.status_code == 404
    assert "unknown provider 'nope'" in response.json()["error"]
    assert receiver.store.inbox.count() == 0


def test_only_post_is_served_on_the_webhook_route(receiver: Receiver) -> None:
    assert receiver.client.get(f"{receiver.url}/webhooks/acme").status_code == 405


def test_a_trailing_slash_or_a_deeper_path_is_no_delivery(receiver: Receiver) -> None:
    body = body_of(event("evt-1"))
    # Starlette's router answers these, as it always did: a redirect to the route, and a 404.
    slashed = receiver.client.post(f"{receiver.url}/webhooks/acme/", content=body, headers=sign(body))
    assert slashed.status_code == 307 and slashed.headers["location"].endswith("/webhooks/acme")
    assert receiver.client.post(f"{receiver.url}/webhooks/acme/x", content=body, headers=sign(body)).status_code == 404
    assert receiver.client.post(f"{receiver.url}/webhooks/", content=body, headers=sign(body)).status_code == 404
    assert receiver.store.inbox.count() == 0


@dataclass
class UrlRecordingProvider(AcmeProvider):
    urls: list[str] = field(default_factory=list)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        self.urls.append(request.url)
        super().verify(request, secrets)


@pytest.mark.parametrize("root_path", ["", "/hooks"])
def test_the_provider_verifies_against_the_url_it_called(
    store: Store, monkeypatch: pytest.MonkeyPatch, root_path: str
) -> None:
    """Schemes that sign the URL (HubSpot v3) need it as called: host, mount point, query."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    provider = UrlRecordingProvider()
    app = create_app(store, providers={"acme": provider}, syncs=[contacts_sync(), audit_sync()])

    async def mounted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        # As a server mounted below a prefix passes requests on (ASGI: path includes root_path).
        if scope["type"] == "http" and root_path:
            scope = {**scope, "root_path": root_path, "path": root_path + scope["path"]}
        await app(scope, receive, send)

    with ServerThread(mounted) as server, httpx.Client(timeout=10) as client:
        for n, query in enumerate(["", "?tenant=north&x=%20y"]):
            body = body_of(event(f"evt-{n}"))
            response = client.post(f"{server.url}/webhooks/acme{query}", content=body, headers=sign(body))
            assert response.status_code == 202, response.text
            assert provider.urls[-1] == f"{server.url}{root_path}/webhooks/acme{query}"
        # Another Host header is another URL (the cache is keyed by what makes the URL).
        body = body_of(event("evt-host"))
        response = client.post(
            f"{server.url}/webhooks/acme", content=body, headers={**sign(body), "Host": "hooks.example.com"}
        )
        assert response.status_code == 202
        assert provider.urls[-1] == f"http://hooks.example.com{root_path}/webhooks/acme"
    assert store.inbox.count() == 3


# -- 5xx ---------------------------------------------------------------------------------------------


def test_a_missing_secret_is_a_503_that_names_the_variable_in_the_log_only(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sync_project.receiver")
    monkeypatch.delenv(SECRET_ENV)
    response = receiver.post(body_of(event("evt-1")))
    assert (response.status_code, response.json()["outcome"]) == (503, "not_configured")
    assert response.headers["retry-after"] == "5"
    assert SECRET_ENV not in response.text and "environment" not in response.text
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sync_project.receiver"]
    assert line["fix"] == f"set {SECRET_ENV}"
    assert receiver.store.inbox.count() == 0


class ParserWithABug(AcmeProvider):
    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        return [
            InboundEvent(event_key=json.loads(request.body)["missing"], event_type="t", account_id=None, payload={})
        ]


def test_a_provider_bug_while_parsing_is_a_500_so_the_provider_retries(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with serve(store, providers={"acme": ParserWithABug()}) as server:
        body = body_of(event("evt-1"))
        response = httpx.post(f"{server.url}/webhooks/acme", content=body, headers=sign(body))
    assert (response.status_code, response.json()["outcome"]) == (500, "parse_failed")
    assert store.inbox.count() == 0
    (bug,) = [r.getMessage() for r in caplog.records if "failed to parse" in r.getMessage()]
    assert "KeyError at" in bug and "in parse" in bug
    assert "missing" not in bug  # the exception's text stays out of the log


def unavailable_store(database_url: str, stack: Any) -> tuple[Store, Any, Any]:
    """A store whose database the test can take away (``down()``) and bring back (``up()``).

    Postgres: the store connects through a TCP proxy that the test cuts, as if the server stopped.
    SQLite: another process holds the write lock past a short busy timeout, as a stuck writer would.
    """
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        proxy = stack.enter_context(TcpProxy(url.host or "127.0.0.1", url.port or 5432))
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        return Store(proxied), proxy.cut, proxy.restore

    engine = make_engine(database_url)

    @sa_event.listens_for(engine, "connect")
    def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=200")

    store = Store(database_url, engine=engine)
    holder = sqlite3.connect(url.database or "", isolation_level=None, check_same_thread=False)
    stack.callback(holder.close)

    def down() -> None:
        holder.execute("BEGIN IMMEDIATE")

    def up() -> None:
        holder.execute("ROLLBACK")

    return store, down, up


def test_with_the_database_down_it_answers_503_and_the_providers_retry_is_stored(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import ExitStack

    monkeypatch.setenv(SECRET_ENV, SECRET)
    with ExitStack() as stack:
        store, down, up = unavailable_store(database_url, stack)
        stack.callback(store.close)
        store.connections.add("acme", "north", account_id="acct-1")
        server = stack.enter_context(serve(store, retry_after_s=7))
        body = body_of(event("evt-1", name="Ada"))
        assert httpx.post(f"{server.url}/webhooks/acme", content=body, headers=sign(body)).status_code == 202
        assert httpx.get(f"{server.url}/healthz").json() == {"database": "ok"}

        down()
        retried = body_of(event("evt-2", name="Grace"))
        refused = httpx.post(f"{server.url}/webhooks/acme", content=retried, headers=sign(retried), timeout=20)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "7"
        health = httpx.get(f"{server.url}/healthz", timeout=20)
        assert (health.status_code, health.json()["database"]) == (503, "unavailable")

        up()
        assert httpx.post(f"{server.url}/webhooks/acme", content=retried, headers=sign(retried)).status_code == 202
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert [e.event_key for e in store.inbox.events()] == ["evt-1", "evt-2"]
        assert store.inbox.events(event_key="evt-2")[0].payload == {"name": "Grace"}


def test_a_kept_connection_that_died_while_idle_is_replaced_without_a_503(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import ExitStack

    monkeypatch.setenv(SECRET_ENV, SECRET)
    with ExitStack() as stack:
        url = make_url(postgres_url)
        proxy = stack.enter_context(TcpProxy(url.host or "127.0.0.1", url.port or 5432))
        store = stack.enter_context(Store(url.set(port=proxy.port).render_as_string(hide_password=False)))
        store.connections.add("acme", "north", account_id="acct-1")
        server = stack.enter_context(serve(store))
        first, second = body_of(event("evt-1")), body_of(event("evt-2"))
        assert httpx.post(f"{server.url}/webhooks/acme", content=first, headers=sign(first)).status_code == 202
        proxy.cut()  # the server drops every connection (a restart, an idle timeout) ...
        proxy.restore()  # ... and accepts new ones at once
        assert httpx.post(f"{server.url}/webhooks/acme", content=second, headers=sign(second)).status_code == 202
        assert [e.event_key for e in store.inbox.events()] == ["evt-1", "evt-2"]


# -- observability -------------------------------------------------------------------------------


def test_each_delivery_logs_one_json_line_without_secret_or_body(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sync_project.receiver")
    stored = body_of(event("evt-1", email="ada@example.com"), event("evt-2"))
    receiver.post(stored)
    receiver.post(stored, headers={})
    receiver.post(b"{", provider="acme")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sync_project.receiver"]
    assert [(line["status"], line["outcome"]) for line in lines] == [
        (202, "stored"),
        (401, "bad_signature"),
        (400, "malformed"),
    ]
    first = lines[0]
    assert first["provider"] == "acme" and first["events"] == 2 and first["event_keys"] == ["evt-1", "evt-2"]
    assert first["stored"] == 2 and first["bytes"] == len(stored) and first["duration_ms"] >= 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in text
    assert "ada@example.com" not in text
    assert sign(stored)["x-acme-signature"] not in text


def test_healthz_reports_the_database(receiver: Receiver) -> None:
    response = receiver.client.get(f"{receiver.url}/healthz")
    assert (response.status_code, response.json()) == (200, {"database": "ok"})
