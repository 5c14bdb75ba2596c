"""Signed outbound delivery over real HTTP: signatures a consumer verifies, retries, the budget."""

from __future__ import annotations

import pytest

from sync_project.core.provider import SignatureError
from sync_project.core.standard_webhooks import generate_secret
from sync_project.notifications.delivery import deliver
from sync_project_tests.support.consumer import Consumer, closed_port_url, serve

BODY = b'{"type":"sync"}'


def send(url: str, secret: str, **overrides: float) -> object:
    options = {"total_timeout_s": 5.0, "max_attempts": 3, "attempt_timeout_s": 2.0, "backoff_s": 0.01} | overrides
    return deliver(url, secret, "msg_1", BODY, **options)  # type: ignore[arg-type]


def test_a_delivery_is_signed_so_the_consumer_can_verify_it():
    secret = generate_secret()
    consumer = Consumer()
    with serve(consumer) as url:
        outcome = send(url, secret)
    assert outcome.delivered and outcome.summary() == "delivered (HTTP 200, attempt 1)"
    [request] = consumer.received
    assert request.body == BODY
    assert request.verified_by(secret) == "msg_1"
    with pytest.raises(SignatureError):
        request.verified_by(generate_secret())


def test_a_5xx_is_retried_under_the_same_id_with_a_fresh_signature():
    secret = generate_secret()
    consumer = Consumer(statuses=[503, 429])
    with serve(consumer) as url:
        outcome = send(url, secret)
    assert outcome.delivered and len(outcome.attempts) == 3
    assert [r.verified_by(secret) for r in consumer.received] == ["msg_1"] * 3


def test_a_4xx_refusal_is_not_retried():
    consumer = Consumer(statuses=[400])
    with serve(consumer) as url:
        outcome = send(url, generate_secret())
    assert not outcome.delivered
    assert outcome.stopped == "refused" and len(consumer.received) == 1
    assert outcome.summary() == "failed after 1 attempt(s), refused (not retried): HTTP 400"


def test_an_app_that_is_down_costs_at_most_the_attempts():
    outcome = send(closed_port_url(), generate_secret())
    assert not outcome.delivered and outcome.stopped == "attempts" and len(outcome.attempts) == 3
    assert "ConnectError" in (outcome.attempts[-1].error or "")


def test_a_hanging_app_is_abandoned_when_the_budget_is_spent():
    consumer = Consumer(hang=True)
    with serve(consumer) as url:
        outcome = send(url, generate_secret(), total_timeout_s=0.6, attempt_timeout_s=5.0, max_attempts=10)
    assert not outcome.delivered
    assert outcome.stopped == "deadline"
    assert outcome.attempts and all("timed out" in (a.error or "") for a in outcome.attempts)


@pytest.mark.parametrize("bad", [{"max_attempts": 0}, {"total_timeout_s": 0}, {"attempt_timeout_s": -1}])
def test_nonsense_limits_are_refused(bad):
    with pytest.raises(ValueError):
        send(closed_port_url(), generate_secret(), **bad)
