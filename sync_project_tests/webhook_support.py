"""What the receiver, inbox and drain tests share: a test provider and syncs, and real servers.

``acme`` is a provider defined here, signing deliveries the way GitHub does (hex HMAC-SHA256 of the
raw body); a delivery holds one event or a batch (like HubSpot). Its API (for thin events whose
handler fetches the full object) is an httpx ``MockTransport`` answering like a REST API would.
The receiver is served for real by uvicorn on a loopback port; ``TcpProxy`` sits between the store
and Postgres so a test can take the database away and bring it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel

from sync_project.core import (
    Delete,
    FetchContext,
    InboundEvent,
    MalformedWebhookError,
    Page,
    Provider,
    Save,
    SignatureError,
    SyncDefinition,
    Update,
    WebhookContext,
    WebhookRequest,
)
from sync_project.core.http import ProviderError, json_body, make_client
from sync_project.serving import BackgroundServer
from sync_project.store import ProviderConnection

SECRET_ENV = "ACME_WEBHOOK_SECRET"
SECRET = "acme-test-secret-9f2c"
SIGNATURE_HEADER = "x-acme-signature"


# -- the provider ---------------------------------------------------------------------------------


@dataclass
class AcmeApi:
    """The provider's REST API as its fixtures: ``GET /contacts/{id}`` answers the stored contact."""

    contacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests += 1
            parts = request.url.path.strip("/").split("/")
            if request.method == "GET" and len(parts) == 2 and parts[0] == "contacts":
                contact = self.contacts.get(parts[1])
                if contact is None:
                    return httpx.Response(404, json={"error": "not_found"})
                return httpx.Response(200, json=contact)
            return httpx.Response(404, json={"error": "no such route"})

        return httpx.MockTransport(handle)


@dataclass
class AcmeProvider(Provider):
    name: str = "acme"
    webhook_secret_env: str | None = SECRET_ENV
    default_base_url: str = "https://api.acme.test"
    api: AcmeApi = field(default_factory=AcmeApi)

    def client(self, connection: ProviderConnection) -> httpx.Client:
        return make_client(self.default_base_url, transport=self.api.transport(), max_attempts=1)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        given = request.headers.get(SIGNATURE_HEADER)
        if not given:
            raise SignatureError(f"missing {SIGNATURE_HEADER} header")
        if not given.startswith("sha256="):
            raise SignatureError(f"{SIGNATURE_HEADER} is not a sha256= signature")
        for secret in secrets:
            expected = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
            if hmac.compare_digest(given.removeprefix("sha256="), expected):
                return
        raise SignatureError("signature does not match the body")

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        document = json.loads(request.body)  # ValueError on bad JSON or UTF-8: the receiver's 400
        raw_events = document.get("events", [document]) if isinstance(document, dict) else None
        if not isinstance(raw_events, list):
            raise MalformedWebhookError("body is neither an event nor {'events': [...]}")
        events = []
        for index, raw in enumerate(raw_events):
            if not isinstance(raw, dict) or not raw.get("id") or not isinstance(raw.get("type"), str):
                raise MalformedWebhookError(f"event #{index} lacks an id or a type")
            data = raw.get("data", {})
            if not isinstance(data, dict):
                raise MalformedWebhookError(f"event #{index}: data is not an object")
            events.append(
                InboundEvent(event_key=raw["id"], event_type=raw["type"], account_id=raw.get("account"), payload=data)
            )
        return events


def sign(body: bytes, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {SIGNATURE_HEADER: f"sha256={digest}", "content-type": "application/json"}


def event(
    event_id: str, event_type: str = "contact.updated", account: str | int | None = "acct-1", **data: Any
) -> dict[str, Any]:
    return {"id": event_id, "type": event_type, "account": account, "data": data}


def body_of(*events: dict[str, Any]) -> bytes:
    document: dict[str, Any] = events[0] if len(events) == 1 else {"events": list(events)}
    return json.dumps(document).encode()


# -- the syncs ------------------------------------------------------------------------------------


class Contact(BaseModel):
    id: str
    name: str = ""
    email: str = ""
    updated_at: datetime | None = None


@dataclass
class Failures:
    """Lets a test make the handler fail for some events, then heal it."""

    failing: set[str] = field(default_factory=set)
    crash_on: set[str] = field(default_factory=set)
    handled: list[str] = field(default_factory=list)


class RunKilled(BaseException):
    """What a killed run looks like from inside: not an ``Exception``, so no handler catches it."""


def contacts_handler(failures: Failures) -> Callable[[WebhookContext, InboundEvent], Iterable[object]]:
    def on_webhook(context: WebhookContext, inbound: InboundEvent) -> Iterator[object]:
        failures.handled.append(inbound.event_key)
        if inbound.event_key in failures.crash_on:
            raise RunKilled(inbound.event_key)
        if inbound.event_key in failures.failing:
            raise ProviderError(f"upstream refused {inbound.event_key}")
        data = inbound.payload
        if inbound.event_type in ("contact.created", "contact.updated"):
            yield Save(data)
        elif inbound.event_type == "contact.patched":
            yield Update(data)
        elif inbound.event_type == "contact.deleted":
            yield Delete({"id": data["id"]})
        elif inbound.event_type == "contact.changed":  # a thin event: fetch the full object
            yield Save(json_body(context.client.get(f"/contacts/{data['id']}")))
        elif inbound.event_type == "contact.bad":
            yield Save({"name": "no primary key"})

    return on_webhook


def _no_fetch(context: FetchContext) -> Iterator[Page]:
    return iter(())


def contacts_sync(failures: Failures | None = None, **overrides: Any) -> SyncDefinition:
    options: dict[str, Any] = {
        "provider": "acme",
        "name": "contacts",
        "model": Contact,
        "fetch": _no_fetch,
        "updated_field": "updated_at",
        "webhook_events": (
            "contact.created",
            "contact.updated",
            "contact.patched",
            "contact.deleted",
            "contact.changed",
            "contact.bad",
        ),
        "on_webhook": contacts_handler(failures or Failures()),
    }
    options.update(overrides)
    return SyncDefinition(**options)


def audit_sync() -> SyncDefinition:
    """A second sync of the same provider, subscribed to every created event (fan-out)."""

    def on_webhook(context: WebhookContext, inbound: InboundEvent) -> Iterator[object]:
        yield Save({"id": inbound.event_key, "type": inbound.event_type})

    return SyncDefinition(
        provider="acme",
        name="audit",
        model=Contact,
        fetch=_no_fetch,
        webhook_events=("contact.created",),
        on_webhook=on_webhook,
    )


def at(seconds: int) -> str:
    """A provider timestamp, ``seconds`` after a fixed epoch."""
    return datetime.fromtimestamp(1_790_000_000 + seconds, timezone.utc).isoformat()


# -- servers --------------------------------------------------------------------------------------


def ServerThread(app: Any) -> BackgroundServer:  # noqa: N802 - reads as the server it builds
    """The receiver app served for real on a free loopback port (with its lifespan: the writer)."""
    return BackgroundServer(app, lifespan="on")


class TcpProxy:
    """A loopback TCP forwarder to ``upstream``; ``cut()`` takes it down, ``restore()`` back up.

    While cut, it drops live connections and closes every new one at once, which is what a
    client sees when the database server stops.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._up = True
        self._closed = False
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)  # shutdown() wakes the thread blocked in accept()
        self._thread.join(5)

    def cut(self) -> None:
        with self._lock:
            self._up = False
            live, self._live = self._live, set()
        for sock in live:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._live.update((client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source)
            _close(target)
            with self._lock:
                self._live.discard(source)
                self._live.discard(target)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already shut down by the other side
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
