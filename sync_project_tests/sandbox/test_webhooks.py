"""Webhook delivery over real HTTP to a loopback receiver: signatures, chaos, retries, pausing."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from sync_project.core.http import ProviderAuthError
from sync_project.core.provider import SignatureError
from sync_project.providers.sandbox import PROVIDER
from sync_project.sandbox import RetryPolicy
from sync_project.sandbox.client import SandboxAdmin
from sync_project_tests.sandbox.support import (  # noqa: F401
    Receiver,
    SandboxFactory,
    free_port,
    make_sandbox,
    receiver,
    wait_until,
)

ACCOUNTS = [{"account_id": "acct-1", "contacts": 10, "deals": 10}, {"account_id": "acct-2", "contacts": 5}]


def test_every_change_is_delivered_once_in_order_and_signed(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    server, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url)
    events = admin.apply_changes(30)
    counts = admin.flush()
    assert (counts.events, counts.sent, counts.pending, counts.failed) == (30, 30, 0, 0)
    assert receiver.ids() == [e["id"] for e in events]
    secrets = [server.webhook_secret]
    for delivery, event in zip(receiver.received, events, strict=True):
        PROVIDER.verify(delivery.as_request(), secrets)
        body = delivery.json
        assert delivery.headers["content-type"] == "application/json"
        assert {k: body[k] for k in ("id", "type", "account_id", "occurred_at")} == {
            k: event[k] for k in ("id", "type", "account_id", "occurred_at")
        }
        assert body["data"]["id"] == event["object_id"]
    with pytest.raises(SignatureError):
        PROVIDER.verify(receiver.received[0].as_request(), ["whsec_" + "A" * 32])


def test_payloads_carry_the_whole_object_after_the_change(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    server, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url)
    admin.apply_changes(40, account_id="acct-1")
    admin.flush()
    truth = admin.truth("acct-1")
    live = {("contact", c["id"]): c for c in truth["contacts"]} | {("deal", d["id"]): d for d in truth["deals"]}
    last: dict[tuple[str, str], dict[str, Any]] = {}
    for delivery in receiver.received:
        body = delivery.json
        kind, _, operation = body["type"].partition(".")
        assert body["account_id"] == "acct-1"
        if operation == "deleted":
            assert body["data"]["deleted"] is True
            assert body["occurred_at"] > body["data"]["updated_at"]
        else:
            assert body["occurred_at"] == body["data"]["updated_at"]
        last[(kind, body["data"]["id"])] = body
    assert {d.json["type"].partition(".")[2] for d in receiver.received} == {"created", "updated", "deleted"}
    for key, body in last.items():
        if body["type"].endswith(".deleted"):
            assert key not in live
            assert body["data"]["id"] in truth["deleted"][key[0] + "s"]
        else:
            assert body["data"] == live[key]  # the last webhook of a live object is its current state


def test_dropped_events_never_arrive_and_are_counted(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    _, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url, chaos={"drop_pct": 40}, seed=5)
    events = admin.apply_changes(50)
    counts = admin.flush()
    assert 0 < counts.dropped < 50
    assert counts.sent == 50 - counts.dropped == len(receiver.received)
    assert set(receiver.ids()) < {e["id"] for e in events}


def test_duplicates_arrive_twice_with_the_same_webhook_id(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    _, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url, chaos={"duplicate_pct": 30}, seed=5)
    events = admin.apply_changes(50)
    counts = admin.flush()
    arrivals = Counter(receiver.ids())
    assert set(arrivals) == {e["id"] for e in events}
    assert 0 < counts.duplicated < 50
    assert sorted(arrivals.values()) == [1] * (50 - counts.duplicated) + [2] * counts.duplicated
    assert counts.sent == 50 + counts.duplicated
    by_id: dict[str, set[bytes]] = {}
    for delivery in receiver.received:
        by_id.setdefault(delivery.headers["webhook-id"], set()).add(delivery.body)
    assert all(len(bodies) == 1 for bodies in by_id.values())  # a duplicate is the same message


def test_the_reorder_window_shuffles_deliveries(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    _, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url, chaos={"delay_s": 0.5}, seed=2)
    events = admin.apply_changes(25)
    assert admin.flush().sent == 25
    order = [e["id"] for e in events]
    assert sorted(receiver.ids()) == sorted(order)
    assert receiver.ids() != order


def test_chaos_can_be_turned_at_runtime(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    _, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url)
    knobs = admin.set_chaos(drop_pct=100)
    assert knobs.drop_pct == 100 and knobs.duplicate_pct == 0
    admin.apply_changes(5)
    assert admin.flush().dropped == 5
    assert admin.set_chaos(drop_pct=0, duplicate_pct=100).duplicate_pct == 100
    admin.apply_changes(5)
    counts = admin.flush()
    assert (counts.sent, counts.duplicated, len(receiver.received)) == (10, 5, 10)


def test_a_failing_receiver_gets_the_event_on_a_later_attempt(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    server, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url)
    receiver.fail_next(3, status=503)
    events = admin.apply_changes(1)
    counts = admin.flush()
    assert (counts.sent, counts.retries, counts.attempts, counts.failed) == (1, 3, 4, 0)
    assert counts.last_error is not None and "HTTP 503" in counts.last_error
    assert receiver.ids() == [events[0]["id"]]
    PROVIDER.verify(receiver.received[0].as_request(), [server.webhook_secret])


def test_a_receiver_that_is_down_receives_everything_once_it_is_back(make_sandbox: SandboxFactory) -> None:
    port = free_port()
    _, admin = make_sandbox(
        accounts=ACCOUNTS,
        webhook_url=f"http://127.0.0.1:{port}/webhooks/sandbox",
        retry=RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.2),
    )
    events = admin.apply_changes(10)
    wait_until(lambda: admin.deliveries().retries >= 3, what="failed attempts against the absent receiver")
    down = admin.deliveries()
    assert (down.sent, down.pending, down.failed) == (0, 10, 0)
    assert "ConnectError" in (down.last_error or "")
    late = Receiver().start(port)
    try:
        counts = admin.flush()
        assert (counts.sent, counts.pending, counts.failed) == (10, 0, 0)
        assert sorted(late.ids()) == sorted(e["id"] for e in events)
    finally:
        late.stop()


def test_deliveries_that_exhaust_their_attempts_count_as_failed(
    make_sandbox: SandboxFactory, receiver: Receiver
) -> None:
    _, admin = make_sandbox(
        accounts=ACCOUNTS, webhook_url=receiver.url, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    )
    receiver.fail_next(4, status=500)
    admin.apply_changes(2)
    counts = admin.flush()
    assert (counts.failed, counts.sent, counts.attempts, counts.retries, counts.pending) == (2, 0, 4, 2, 0)
    assert receiver.received == []


def test_paused_deliveries_queue_up_and_flow_when_resumed(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    server, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url, chaos={"paused": True})
    events = admin.apply_changes(6)
    assert admin.deliveries().pending == 6
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {server.admin_token}"}) as http:
        refused = http.post("/admin/flush")
    assert refused.status_code == 409
    assert "paused" in refused.json()["message"]
    assert receiver.received == []
    admin.set_chaos(paused=False)
    assert admin.flush().sent == 6
    assert receiver.ids() == [e["id"] for e in events]


def test_flush_times_out_with_504_while_deliveries_are_held(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    server, admin = make_sandbox(accounts=ACCOUNTS, webhook_url=receiver.url, chaos={"delay_s": 3600})
    admin.apply_changes(1)
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {server.admin_token}"}) as http:
        response = http.post("/admin/flush", params={"timeout_s": 0})
    assert response.status_code == 504
    assert response.json()["message"] == "1 deliveries still pending after 0 s"


def test_without_a_subscription_nothing_is_sent(make_sandbox: SandboxFactory, receiver: Receiver) -> None:
    _, admin = make_sandbox(accounts=ACCOUNTS)
    admin.apply_changes(3)
    counts = admin.flush()
    assert (counts.unsubscribed, counts.events, counts.sent) == (3, 0, 0)
    admin.set_webhook_url(receiver.url)
    events = admin.apply_changes(2)
    assert admin.flush().sent == 2
    assert receiver.ids() == [e["id"] for e in events]


def test_the_admin_client_names_a_wrong_admin_token(make_sandbox: SandboxFactory) -> None:
    server, _ = make_sandbox(accounts=ACCOUNTS)
    with (
        SandboxAdmin(server.base_url, "wrong-admin-token") as admin,
        pytest.raises(ProviderAuthError, match="HTTP 401"),
    ):
        admin.deliveries()
