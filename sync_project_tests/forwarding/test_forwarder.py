"""Forwarding over real HTTP on loopback, on both backends: signed provider deliveries into the
receiver, the forwarder passing them on to the customer's app, which is down, slow or refusing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from sync_project.core.standard_webhooks import generate_secret
from sync_project.forwarding.forwarder import Forwarder, ForwarderSettings, ForwardingConfigError
from sync_project.receiver.app import create_app
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project_tests.support.consumer import Consumer, closed_port_url, serve
from sync_project_tests.webhook_support import (
    SECRET,
    SECRET_ENV,
    AcmeProvider,
    audit_sync,
    body_of,
    contacts_sync,
    event,
    sign,
)

FORWARD_SECRET = generate_secret()


@pytest.fixture
def receiver(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south", account_id="acct-2")
    app = create_app(store, providers={"acme": AcmeProvider()}, syncs=[contacts_sync(), audit_sync()])
    with BackgroundServer(app) as server:
        yield server.url


def post(receiver: str, *events: dict) -> int:
    body = body_of(*events)
    return httpx.post(f"{receiver}/webhooks/acme", content=body, headers=sign(body)).status_code


@contextmanager
def forwarder(store: Store, url: str, **options: object) -> Iterator[Forwarder]:
    settings = ForwarderSettings(url=url, secret=FORWARD_SECRET, start_at="beginning", **options)  # type: ignore[arg-type]
    with Forwarder(store, settings) as worker:
        yield worker


def test_each_delivery_is_forwarded_once_per_connection_after_it_was_stored(store: Store, receiver: str):
    def stored_when_received(headers: dict[str, str], body: bytes) -> bool:

        return bool(store.inbox.events(event_key=json.loads(body)["event_key"]))

    consumer = Consumer(on_receive=stored_when_received)
    with serve(consumer) as url, forwarder(store, url) as worker:
        # contact.created goes to two syncs (contacts, audit): still one forward.
        assert post(receiver, event("evt-1", "contact.created", account="acct-1", id="c1", name="Ada")) == 202
        assert (
            post(
                receiver,
                event("evt-2", "contact.updated", account="acct-2", id="c2", name="Bob"),
                event("evt-3", "invoice.paid", account="acct-1", id="i1"),
            )
            == 202
        )
        result = worker.run_once()
    assert (result.delivered, result.retrying, result.dead) == (3, 0, 0)
    assert all(request.observed is True for request in consumer.received)
    bodies = {request.json["event_key"]: request.json for request in consumer.received}
    assert set(bodies) == {"evt-1", "evt-2", "evt-3"}
    assert bodies["evt-1"]["connection_id"] == "north" and bodies["evt-1"]["payload"] == {"id": "c1", "name": "Ada"}
    assert bodies["evt-2"]["connection_id"] == "south" and bodies["evt-2"]["type"] == "forward"
    assert bodies["evt-3"]["connection_id"] == "north"  # no sync wants it; forwarded all the same
    ids = {request.verified_by(FORWARD_SECRET) for request in consumer.received}
    assert len(ids) == 3 and all(i.startswith("fwd_") for i in ids)
    assert worker.run_once().delivered == 0  # each once


def test_an_app_that_is_down_gets_its_forwards_later(store: Store, receiver: str):
    url = closed_port_url()
    port = int(url.split(":")[2].split("/")[0])
    t0 = datetime.now(timezone.utc)
    with forwarder(store, url, base_delay_s=60) as worker:
        assert post(receiver, event("evt-1", account="acct-1", id="c1")) == 202
        down = worker.run_once(now=t0)
        assert (down.delivered, down.retrying) == (0, 1)
        [waiting] = store.forwards().list(status="pending")
        assert waiting.attempts == 1 and "ConnectError" in (waiting.last_error or "")

        consumer = Consumer()
        app_server = BackgroundServer(consumer.app(), port=port).start()
        try:
            assert worker.run_once(now=t0 + timedelta(seconds=30)).delivered == 0  # still backing off
            assert worker.run_once(now=t0 + timedelta(seconds=61)).delivered == 1
        finally:
            app_server.stop()
    [request] = consumer.received
    assert request.json["event_key"] == "evt-1" and request.verified_by(FORWARD_SECRET)
    assert store.forwards().stats().counts["delivered"] == 1


def test_a_forward_is_dead_after_max_attempts_and_can_be_replayed(store: Store, receiver: str):
    consumer = Consumer(default_status=500)
    t0 = datetime.now(timezone.utc)
    with serve(consumer) as url, forwarder(store, url, max_attempts=3, base_delay_s=1) as worker:
        assert post(receiver, event("evt-1", account="acct-1", id="c1")) == 202
        outcomes = [worker.run_once(now=t0 + timedelta(hours=hour)) for hour in range(4)]
        assert [(o.retrying, o.dead) for o in outcomes] == [(1, 0), (1, 0), (0, 1), (0, 0)]
        [dead] = store.forwards().list(status="dead")
        assert (dead.attempts, dead.last_error) == (3, "HTTP 500")
        assert len({request.verified_by(FORWARD_SECRET) for request in consumer.received}) == 1  # one id, 3 tries

        consumer.default_status = 204
        assert store.forwards().replay_dead() == 1
        assert worker.run_once(now=t0 + timedelta(hours=5)).delivered == 1
    assert len(consumer.received) == 4


def test_a_hanging_app_neither_slows_the_receiver_nor_loses_forwards(store: Store, receiver: str):
    consumer = Consumer(hang=True)
    stop = threading.Event()
    with serve(consumer) as url, forwarder(store, url, attempt_timeout_s=30, concurrency=1) as worker:
        runner = threading.Thread(target=worker.run, args=(stop,))
        runner.start()
        try:
            assert post(receiver, event("evt-1", account="acct-1", id="c1")) == 202
            while not consumer.received:  # the worker is now stuck on the app
                stop.wait(0.02)
            statuses = [post(receiver, event(f"evt-{n}", account="acct-1", id=f"c{n}")) for n in range(2, 12)]
            assert statuses == [202] * 10
            assert store.inbox.count(sync="acme/contacts") == 11
        finally:
            consumer.hang = False
            consumer.release()
            while store.forwards().stats().counts["delivered"] < 11:
                stop.wait(0.05)
            stop.set()
            runner.join()
    assert {request.json["event_key"] for request in consumer.received} == {f"evt-{n}" for n in range(1, 12)}


def test_two_forwarders_deliver_each_forward_once(store: Store, receiver: str):
    consumer = Consumer()
    with serve(consumer) as url, forwarder(store, url) as one, forwarder(store, url) as two:
        for n in range(6):
            assert post(receiver, event(f"evt-{n}", account="acct-1", id=f"c{n}")) == 202
        delivered = one.run_once().delivered + two.run_once().delivered + one.run_once().delivered
    assert delivered == 6
    keys = [request.json["event_key"] for request in consumer.received]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6


def test_forwarding_settings_come_from_the_environment_and_must_be_signed():
    with pytest.raises(ForwardingConfigError, match="SYNC_FORWARD_URL"):
        ForwarderSettings.from_env({})
    with pytest.raises(ForwardingConfigError, match="SYNC_FORWARD_SECRET is not"):
        ForwarderSettings.from_env({"SYNC_FORWARD_URL": "http://127.0.0.1:9/hook"})
    with pytest.raises(ForwardingConfigError, match="whsec_"):
        ForwarderSettings.from_env({"SYNC_FORWARD_URL": "http://127.0.0.1:9/hook", "SYNC_FORWARD_SECRET": "plain"})
    settings = ForwarderSettings.from_env(
        {"SYNC_FORWARD_URL": "http://127.0.0.1:9/hook", "SYNC_FORWARD_SECRET": FORWARD_SECRET}
    )
    assert settings.url == "http://127.0.0.1:9/hook" and FORWARD_SECRET not in repr(settings)
