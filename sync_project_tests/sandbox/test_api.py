"""The sandbox API over real HTTP on loopback: auth, pagination, updated_after, 429, admin."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from sync_project.core import ProviderConnection
from sync_project.core.http import ProviderError, json_body
from sync_project.providers.sandbox import PROVIDER
from sync_project_tests.sandbox.support import SandboxFactory, make_sandbox, wait_until  # noqa: F401

TOKEN = "token-of-acct-1"


def api(base_url: str, token: str = TOKEN) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {token}"}, timeout=10)


def list_all(client: httpx.Client, kind: str, **params: Any) -> Iterator[dict[str, Any]]:
    """Pages with no retrying client in between: what a page says is what the server said."""
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/{kind}", params=query).json()
        yield from page["results"]
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            return


@pytest.fixture
def crm(make_sandbox: SandboxFactory) -> tuple[Any, Any]:
    return make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 25, "deals": 12}])


def test_unknown_or_missing_tokens_get_401(crm: tuple[Any, Any]) -> None:
    server, _ = crm
    with httpx.Client(base_url=server.base_url) as anonymous:
        missing = anonymous.get("/v1/contacts")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/deals", headers={"authorization": "Basic abc"}).status_code == 401
    with api(server.base_url, "not-a-token") as wrong:
        response = wrong.get("/v1/contacts")
        assert response.status_code == 401
        assert response.json() == {"error": "unauthorized", "message": "unknown API token"}
        assert wrong.get("/v1/contacts/con_000001").status_code == 401
    # An account token is no admin token.
    with api(server.base_url) as account:
        assert account.get("/admin/truth", params={"account_id": "acct-1"}).status_code == 401
        assert account.post("/admin/changes", json={"count": 1}).status_code == 401


def test_the_token_decides_the_account(make_sandbox: SandboxFactory) -> None:
    server, admin = make_sandbox(accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 2}])
    account_id, token = admin.create_account(contacts=3)
    assert account_id == "acct-2"
    with api(server.base_url) as one, api(server.base_url, token) as two:
        assert one.get("/v1/account").json() == {"account_id": "acct-1"}
        assert two.get("/v1/account").json() == {"account_id": "acct-2"}
        assert [c["id"] for c in list_all(two, "contacts")] == ["con_000001", "con_000002", "con_000003"]
        assert len(list(list_all(one, "contacts"))) == 2
        # Ids repeat across accounts; each account sees its own object.
        assert one.get("/v1/contacts/con_000001").json() != two.get("/v1/contacts/con_000001").json()


def test_pages_cover_everything_once_in_updated_at_order(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    with api(server.base_url) as client:
        first = client.get("/v1/contacts", params={"limit": 10}).json()
        assert len(first["results"]) == 10 and first["has_more"]
        contacts = list(list_all(client, "contacts", limit=10))
        deals = list(list_all(client, "deals", limit=5))
    truth = admin.truth("acct-1")
    keys = [(c["updated_at"], c["id"]) for c in contacts]
    assert keys == sorted(keys) and len(set(keys)) == 25
    assert sorted(contacts, key=lambda c: c["id"]) == truth["contacts"]
    assert sorted(deals, key=lambda d: d["id"]) == truth["deals"]


def test_updated_after_returns_exactly_what_changed_since(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    with api(server.base_url) as client:
        watermark = max(c["updated_at"] for c in list_all(client, "contacts"))
        events = admin.apply_changes(30, deal_share=0)
        changed = list(list_all(client, "contacts", updated_after=watermark, limit=7))
    live = {c["id"]: c for c in admin.truth("acct-1")["contacts"]}
    touched_and_live = {e["object_id"] for e in events} & set(live)
    assert {c["id"] for c in changed} == touched_and_live
    assert all(c == live[c["id"]] for c in changed)
    assert all(c["updated_at"] > watermark for c in changed)


def test_no_change_is_missed_when_changes_happen_between_pages(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    seen: dict[str, dict[str, Any]] = {}
    with api(server.base_url) as client:
        cursor = None
        pages = 0
        while True:
            page = client.get("/v1/contacts", params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
            seen.update({c["id"]: c for c in page["results"]})
            pages += 1
            if pages <= 5:
                # Touches objects already passed, not yet reached, new ones, and deletes some.
                admin.apply_changes(6, deal_share=0)
            cursor = page["next_cursor"]
            if cursor is None:
                break
    final = {c["id"]: c for c in admin.truth("acct-1")["contacts"]}
    assert {i: seen[i] for i in final} == final


def test_get_by_id_and_404_once_deleted(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    truth = admin.truth("acct-1")
    with api(server.base_url) as client:
        assert client.get(f"/v1/deals/{truth['deals'][0]['id']}").json() == truth["deals"][0]
        deleted = admin.apply_changes(1, create=0, update=0, delete=1, deal_share=0)[0]
        assert deleted["type"] == "contact.deleted"
        gone = client.get(f"/v1/contacts/{deleted['object_id']}")
        assert gone.status_code == 404
        assert gone.json()["error"] == "not_found"
        assert deleted["object_id"] not in {c["id"] for c in list_all(client, "contacts")}
        assert client.get("/v1/contacts/con_999999").status_code == 404
        assert client.get("/v1/tickets").status_code == 404
    assert deleted["object_id"] in admin.truth("acct-1")["deleted"]["contacts"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit must be between 1 and 100"),
        ({"limit": "101"}, "limit must be between 1 and 100"),
        ({"limit": "ten"}, "limit must be an integer"),
        ({"updated_after": "last tuesday"}, "not an ISO-8601 timestamp"),
        ({"cursor": "%%%not-base64"}, "cursor is not one this API issued"),
        ({"cursor": "WyJ4Il0"}, "cursor is not one this API issued"),
    ],
)
def test_bad_list_parameters_get_400_saying_why(crm: tuple[Any, Any], params: dict[str, str], message: str) -> None:
    server, _ = crm
    with api(server.base_url) as client:
        response = client.get("/v1/contacts", params=params)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_a_cursor_only_works_on_the_list_that_issued_it(crm: tuple[Any, Any]) -> None:
    server, _ = crm
    with api(server.base_url) as client:
        cursor = client.get("/v1/deals", params={"limit": 2}).json()["next_cursor"]
        response = client.get("/v1/contacts", params={"cursor": cursor})
    assert response.status_code == 400
    assert response.json()["message"] == "cursor was not issued by the contacts list"


def test_rate_limit_answers_429_with_retry_after(make_sandbox: SandboxFactory) -> None:
    server, admin = make_sandbox(
        accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 1}],
        rate_limit={"rate_per_s": 0.01, "burst": 2},
    )
    _, other_token = admin.create_account()
    with api(server.base_url) as client:
        assert [client.get("/v1/contacts").status_code for _ in range(2)] == [200, 200]
        limited = client.get("/v1/contacts")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "100"  # one token at 0.01/s
        assert limited.json()["error"] == "rate_limited"
        assert server.sandbox.rate_limiter.rejected == 1
    with api(server.base_url, other_token) as other:
        assert other.get("/v1/contacts").status_code == 200  # buckets are per token
    admin.set_rate_limit(enabled=False)
    with api(server.base_url) as client:
        assert client.get("/v1/contacts").status_code == 200


def test_the_provider_client_waits_out_429s(make_sandbox: SandboxFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server, _ = make_sandbox(
        accounts=[{"account_id": "acct-1", "token": TOKEN, "contacts": 3}],
        rate_limit={"rate_per_s": 2, "burst": 1},
    )
    monkeypatch.setenv("TEST_SANDBOX_TOKEN", TOKEN)
    now = datetime.now(timezone.utc)
    connection = ProviderConnection(
        provider="sandbox",
        connection_id="c1",
        account_id="acct-1",
        credentials_env="TEST_SANDBOX_TOKEN",
        config={"base_url": server.base_url},
        created_at=now,
        updated_at=now,
    )
    with PROVIDER.client(connection) as client:
        bodies = [json_body(client.get("/v1/contacts")) for _ in range(3)]
    assert [len(b["results"]) for b in bodies] == [3, 3, 3]
    assert server.sandbox.rate_limiter.rejected >= 1  # the limit was really in force


def test_truth_equals_what_the_api_lists(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    admin.apply_changes(40)
    with api(server.base_url) as client:
        listed = {kind: sorted(list_all(client, kind), key=lambda o: o["id"]) for kind in ("contacts", "deals")}
    truth = admin.truth("acct-1")
    assert truth["contacts"] == listed["contacts"]
    assert truth["deals"] == listed["deals"]
    assert truth["account_id"] == "acct-1"


def test_admin_requests_are_validated(crm: tuple[Any, Any]) -> None:
    server, admin = crm
    with httpx.Client(base_url=server.base_url, headers={"authorization": f"Bearer {server.admin_token}"}) as http:
        cases = [
            (http.post("/admin/changes", json={"count": 0}), 400, "count"),
            (http.post("/admin/changes", json={"count": 1, "account_id": "acct-9"}), 404, "unknown account"),
            (http.post("/admin/changes", content=b"{not json"), 400, "not JSON"),
            (http.post("/admin/changes", json=[1, 2]), 400, "JSON object"),
            (http.post("/admin/changes", json={"count": 1, "colour": "red"}), 400, "colour"),
            (http.post("/admin/accounts", json={"account_id": "acct-1"}), 409, "already exists"),
            (http.post("/admin/chaos", json={"drop_pct": 150}), 400, "drop_pct"),
            (http.post("/admin/generator", json={"account_ids": ["acct-9"]}), 400, "unknown account"),
            (http.get("/admin/truth"), 400, "account_id is required"),
            (http.get("/admin/truth", params={"account_id": "acct-9"}), 404, "unknown account"),
            (http.post("/admin/flush", params={"timeout_s": "soon"}), 400, "timeout_s"),
        ]
    for response, status, message in cases:
        assert (response.status_code, message in response.json()["message"]) == (status, True), response.text
    with pytest.raises(ProviderError, match="HTTP 409"):
        admin.create_account("acct-1")


def test_the_generator_changes_data_until_stopped(crm: tuple[Any, Any]) -> None:
    _, admin = crm
    before = admin.truth("acct-1")
    status = admin.set_generator(running=True, rate_per_s=200)
    assert status.settings.running and status.settings.rate_per_s == 200
    wait_until(lambda: admin.generator().applied >= 20, what="the generator to apply changes")
    stopped = admin.set_generator(running=False)
    assert not stopped.settings.running
    settled = admin.truth("acct-1")
    assert settled != before
    # Stopping is synchronous: once the call returned, nothing more changes.
    assert admin.truth("acct-1") == settled
    assert admin.generator().applied == stopped.applied
