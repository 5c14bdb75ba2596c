"""Signed input that can never succeed is a 400 with a one-line reason, refused before the group
commit: it stores nothing and never fails the batch it would have been committed with.

Served for real on loopback, on both backends: Postgres is the one that refuses NUL and lone
surrogates, so each case must be refused the same way before either database sees it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from sync_project.receiver import create_app
from sync_project.receiver.app import ReceiverConfigError
from sync_project.store import Store
from sync_project_tests.receiver.test_app import Receiver, serve
from sync_project_tests.webhook_support import (
    SECRET,
    SECRET_ENV,
    AcmeProvider,
    ServerThread,
    body_of,
    contacts_sync,
    event,
    sign,
)


@pytest.fixture
def receiver(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    with serve(store, max_json_depth=8) as server, httpx.Client(timeout=10) as client:
        yield Receiver(server.url, store, client)


def nested(depth: int) -> dict:
    """An event whose data nests ``depth`` levels in all (the envelope and data are two of them)."""
    value: object = 1
    for _ in range(depth - 2):
        value = [value]
    return event("evt-deep", blob=value)


def raw_event(event_id: str, account: str = "acct-1", **data: object) -> bytes:
    """A body written as text, so escapes like \\u0000 reach the receiver exactly as a provider sent them."""
    return json.dumps({"id": event_id, "type": "contact.updated", "account": account, "data": data}).encode()


UNSTORABLE = [
    pytest.param(raw_event("evt-\u0000"), "event key contains a NUL character", id="nul-in-event-key"),
    pytest.param(raw_event("evt-1", account="acct\u00001"), "account id contains a NUL", id="nul-in-account-id"),
    pytest.param(raw_event("evt-1", name="Ada\u0000"), "payload.name contains a NUL", id="nul-in-payload"),
    pytest.param(raw_event("evt-1", **{"na\u0000me": "Ada"}), "(a key) contains a NUL", id="nul-in-a-key"),
    pytest.param(
        b'{"id": "evt-1", "type": "t", "data": {"n": "\\ud800"}}', "lone UTF-16 surrogate", id="lone-surrogate"
    ),
    pytest.param(b'{"id": "evt-\\udfff", "type": "t", "data": {}}', "event key contains a lone", id="surrogate-in-key"),
    pytest.param(b'{"id": "evt-1", "type": "t", "data": {"n": Infinity}}', "not storable JSON", id="infinity"),
    pytest.param(body_of(event("evt-1", "t" * 256)), "event type is longer than 255", id="long-event-type"),
]


@pytest.mark.parametrize("body, reason", UNSTORABLE)
def test_a_value_no_database_stores_is_a_400_naming_it(receiver: Receiver, body: bytes, reason: str) -> None:
    response = receiver.post(body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]
    assert receiver.store.inbox.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            b'{"id": "evt-1", "type": "contact.updated", "data": {"n": "\\ud83d\\ude00"}}', id="surrogate-pair"
        ),
        pytest.param(raw_event("evt-1", name="back\\u0000slash"), id="literal-backslash-u0000"),
        pytest.param(raw_event("evt-1", name="Zoë 名前 \U0001f600"), id="non-ascii"),
    ],
)
def test_look_alikes_of_unstorable_values_are_stored(receiver: Receiver, body: bytes) -> None:
    assert receiver.post(body).status_code == 202
    (row,) = receiver.store.inbox.events()
    assert row.payload == json.loads(body)["data"]


def test_json_nested_past_the_limit_is_a_400_and_at_the_limit_is_stored(receiver: Receiver) -> None:
    assert receiver.post(body_of(nested(8))).status_code == 202
    response = receiver.post(body_of(nested(9)))
    assert (response.status_code, response.json()["error"]) == (400, "JSON nested deeper than 8 levels")
    assert receiver.store.inbox.count() == 1


def test_brackets_inside_strings_do_not_count_as_nesting(receiver: Receiver) -> None:
    assert receiver.post(body_of(event("evt-1", name='[[[[[[[[[[{{{{{{{{{{ \\" [[[[[['))).status_code == 202


def test_json_deeper_than_pythons_parser_recurses_is_a_400_not_a_recursion_error(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    body = b'{"id": "evt-1", "type": "t", "data": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    with serve(receiver.store, max_body_bytes=1 << 20) as server:
        response = httpx.post(f"{server.url}/webhooks/acme", content=body, headers=sign(body), timeout=10)
    assert (response.status_code, response.json()["error"]) == (400, "JSON nested deeper than 64 levels")
    assert not [r for r in caplog.records if r.exc_info]


def test_every_refusal_is_one_line_and_logged_without_a_traceback(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bodies = [b"{\n\n", raw_event("evt-\u0000"), body_of(nested(9)), b'{"id": "evt-1", "type": 5}']
    for body in bodies:
        response = receiver.post(body)
        assert response.status_code == 400
        assert "\n" not in response.json()["error"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sync_project.receiver"]
    assert [line["status"] for line in lines] == [400] * len(bodies)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_an_unstorable_delivery_among_concurrent_ones_never_reaches_the_group_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The found case: a NUL in an account id failed inside the batch's transaction on Postgres,
    and the batch was committed again one delivery at a time."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    store.connections.add("acme", "north", account_id="acct-1")
    bodies = [body_of(event(f"evt-{i}")) for i in range(20)]
    bodies.insert(10, raw_event("evt-bad", account="acct-\u00001"))
    app = create_app(store, providers={"acme": AcmeProvider()}, syncs=[contacts_sync()])

    async def send_all(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=20) as client:
            return await asyncio.gather(
                *(client.post(f"{url}/webhooks/acme", content=b, headers=sign(b)) for b in bodies)
            )

    with ServerThread(app) as server:
        responses = asyncio.run(send_all(server.url))
    assert [r.status_code for r in responses] == [202] * 10 + [400] + [202] * 10
    assert store.inbox.count() == 20
    assert app.state.committer.committed_items == 20, "the bad delivery was refused before the commit"
    assert not [r for r in caplog.records if "one by one" in r.getMessage()]


def test_a_secret_the_scheme_cannot_use_stops_the_receiver_at_start_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sync_project.providers.sandbox import PROVIDER

    monkeypatch.setenv("SYNC_SANDBOX_WEBHOOK_SECRET", "whsec_not*base64")
    with pytest.raises(ReceiverConfigError, match="SYNC_SANDBOX_WEBHOOK_SECRET") as raised:
        create_app(store, providers={"sandbox": PROVIDER}, syncs=[])
    assert "not*base64" not in str(raised.value)
