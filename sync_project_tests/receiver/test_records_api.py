"""The records API over real HTTP on loopback, on both backends: auth, paging under concurrent
writes, filters, and every bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.engine import make_url

from sync_project.receiver.app import ReceiverConfigError, create_app
from sync_project.serving import BackgroundServer
from sync_project.store import Store
from sync_project.store.engine import make_engine
from sync_project.store.feed import encode_cursor
from sync_project_tests.webhook_support import TcpProxy, contacts_sync

TOKEN = "rec_test_token_5b1d"
SYNC = contacts_sync(updated_field=None)  # override: records without provider timestamps
SPEC = SYNC.record_spec
PATH = "/records/acme/contacts"


@contextmanager
def api(store: Store, monkeypatch: pytest.MonkeyPatch, token: str | None = TOKEN) -> Iterator[httpx.Client]:
    if token is None:
        monkeypatch.delenv("SYNC_RECORDS_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SYNC_RECORDS_API_TOKEN", token)
    with BackgroundServer(create_app(store, providers={}, syncs=[SYNC])) as server:
        with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
            yield client


@pytest.fixture
def seeded(store: Store) -> Store:
    store.connections.add("acme", "north", account_id="acct-1")
    store.connections.add("acme", "south", account_id="acct-2")
    store.save(SYNC.key, "north", SPEC, [{"id": f"c{n:03d}", "name": f"v0-{n}"} for n in range(30)])
    store.save(SYNC.key, "south", SPEC, [{"id": "s1", "name": "elsewhere"}])
    return store


def test_a_request_without_a_valid_token_is_refused(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    with api(seeded, monkeypatch) as client:
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": f"Basic {TOKEN}"},
            {"authorization": "Bearer"},
        ):
            response = httpx.get(f"{client.base_url}{PATH}", params={"connection": "north"}, headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "records" not in response.json()
        assert client.get(PATH, params={"connection": "north"}).status_code == 200


def test_several_tokens_can_be_valid_during_a_rotation(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    with api(seeded, monkeypatch, token=f"old_token_1, {TOKEN}") as client:
        assert client.get(PATH, params={"connection": "north"}).status_code == 200
        old = httpx.get(
            f"{client.base_url}{PATH}", params={"connection": "north"}, headers={"authorization": "Bearer old_token_1"}
        )
        assert old.status_code == 200


def test_without_a_configured_token_the_api_is_off_and_the_log_says_how_to_turn_it_on(
    seeded: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    with api(seeded, monkeypatch, token=None) as client:
        response = client.get(PATH, params={"connection": "north"})
    assert response.status_code == 503
    assert "SYNC_RECORDS_API" not in response.text
    assert any("set SYNC_RECORDS_API_TOKEN" in r.getMessage() for r in caplog.records)


def test_pages_of_one_connection_with_cursor_and_limit(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    with api(seeded, monkeypatch) as client:
        first = client.get(PATH, params={"connection": "north", "limit": 20}).json()
        assert len(first["records"]) == 20 and first["has_more"] is True
        second = client.get(PATH, params={"connection": "north", "limit": 20, "cursor": first["next_cursor"]}).json()
        assert len(second["records"]) == 10 and second["has_more"] is False
        caught_up = client.get(PATH, params={"connection": "north", "cursor": second["next_cursor"]}).json()
    assert caught_up == {"records": [], "next_cursor": second["next_cursor"], "has_more": False}
    ids = [r["id"] for r in first["records"] + second["records"]]
    assert sorted(ids) == [f"c{n:03d}" for n in range(30)]
    record = first["records"][0]
    assert set(record) == {
        "id",
        "connection_id",
        "data",
        "last_action",
        "first_seen_at",
        "last_modified_at",
        "source_updated_at",
        "deleted_at",
    }
    assert record["connection_id"] == "north" and record["last_action"] == "added"


def test_paging_while_records_change_skips_none(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    truth: dict[str, dict[str, Any] | None] = {f"c{n:03d}": {"id": f"c{n:03d}", "name": f"v0-{n}"} for n in range(30)}
    seen: dict[str, dict[str, Any] | None] = {}
    with api(seeded, monkeypatch) as client:
        cursor, page_number = None, 0
        while True:
            params = {"connection": "north", "limit": 6} | ({"cursor": cursor} if cursor else {})
            page = client.get(PATH, params=params).json()
            for record in page["records"]:  # the consumer upserts by id
                seen[record["id"]] = None if record["deleted_at"] else record["data"]
            cursor, page_number = page["next_cursor"], page_number + 1
            if page_number <= 6:  # writes land between page requests: behind and ahead of the cursor
                behind = sorted(seen)[page_number % len(seen)]
                ahead = f"c{(page_number * 5 + 17) % 30:03d}"
                new = f"n{page_number:03d}"
                changes = {behind: f"v{page_number}-behind", ahead: f"v{page_number}-ahead", new: "brand new"}
                seeded.save(SYNC.key, "north", SPEC, [{"id": k, "name": v} for k, v in changes.items()])
                truth.update({k: {"id": k, "name": v} for k, v in changes.items()})
                gone = f"c{(page_number * 7) % 30:03d}"
                seeded.delete(SYNC.key, "north", SPEC, [{"id": gone}])
                truth[gone] = None
            if not page["has_more"]:
                break
    assert page_number > 6
    assert seen == truth


def test_filter_and_modified_after_narrow_the_feed(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    cut = datetime.now(timezone.utc)
    seeded.save(SYNC.key, "north", SPEC, [{"id": "c001", "name": "renamed"}, {"id": "x1", "name": "new"}])
    seeded.delete(SYNC.key, "north", SPEC, [{"id": "c002"}])
    with api(seeded, monkeypatch) as client:
        since = client.get(PATH, params={"connection": "north", "modified_after": cut.isoformat()}).json()["records"]
        assert sorted(r["id"] for r in since) == ["c001", "c002", "x1"]
        zulu = cut.isoformat().replace("+00:00", "Z")
        deleted = client.get(PATH, params={"connection": "north", "modified_after": zulu, "filter": "deleted"}).json()[
            "records"
        ]
        assert [(r["id"], r["last_action"]) for r in deleted] == [("c002", "deleted")]
        both = client.get(
            PATH, params={"connection": "north", "modified_after": zulu, "filter": "added,updated"}
        ).json()["records"]
        assert sorted((r["id"], r["last_action"]) for r in both) == [("c001", "updated"), ("x1", "added")]
        south = client.get(PATH, params={"connection": "south"}).json()["records"]
        assert [r["id"] for r in south] == ["s1"]


def raw_cursor(content: object) -> str:
    """A cursor encoded as the API encodes one, around any JSON (``"\\u..."`` escapes kept as written)."""
    text = content if isinstance(content, str) else json.dumps(content)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "connection parameter is required"),
        ({"connection": "north", "limit": "0"}, "between 1 and 10000"),
        ({"connection": "north", "limit": "10001"}, "between 1 and 10000"),
        ({"connection": "north", "limit": "ten"}, "limit must be an integer"),
        ({"connection": "north", "filter": "created"}, "filter takes added, updated, deleted"),
        ({"connection": "north", "filter": ","}, "filter takes"),
        ({"connection": "north", "modified_after": "yesterday"}, "not an ISO 8601 timestamp"),
        ({"connection": "north", "modified_after": "2026-01-02T03:04:05"}, "needs a time zone"),
        ({"connection": "north", "cursor": "not-a-cursor"}, "invalid cursor"),
        ({"connection": "north", "modifiedAfter": "2026-01-02T03:04:05Z"}, "unknown parameter(s) modifiedAfter"),
        ([("connection", "north"), ("limit", "5"), ("limit", "6")], "more than once: limit"),
        # What the fuzz campaign found answered 500, and their neighbours:
        ({"connection": "north", "modified_after": "0001-01-01T00:00:00+14:00"}, "outside the years 1 to 9999"),
        ({"connection": "north", "modified_after": "9999-12-31T23:59:59-14:00"}, "outside the years 1 to 9999"),
        ({"connection": "north", "cursor": raw_cursor(["0001-01-01T00:00:00+14:00", "c001"])}, "cursor's timestamp"),
        ({"connection": "north", "cursor": raw_cursor(["9999-12-31T23:59:59-14:00", "c001"])}, "cursor's timestamp"),
        ({"connection": "north", "cursor": raw_cursor(deep(900))}, "invalid cursor"),
        ({"connection": "north", "cursor": raw_cursor(["2026-01-01T00:00:00+00:00", "c\u0000"])}, "record id"),
        ({"connection": "north", "cursor": raw_cursor(["2026-01-01T00:00:00+00:00", "\ud800"])}, "record id"),
        ({"connection": "north", "cursor": raw_cursor(["2026-01-01T00:00:00", "c001"])}, "invalid cursor"),
        ({"connection": "north", "cursor": "A" * 5000}, "invalid cursor"),
        ({"connection": "north", "cursor": "é"}, "invalid cursor"),
        ({"connection": "nor\x00th"}, "without control characters"),
        ({"connection": "n" * 256}, "at most 255 characters"),
        ({"connection": "north", "limit": "٥"}, "limit must be an integer"),
        ({"connection": "north", "limit": "9" * 5000}, "limit must be an integer"),
        ({"connection": "north", "limit": "+5"}, "limit must be an integer"),
    ],
)
def test_bad_parameters_are_refused_with_400(seeded: Store, monkeypatch: pytest.MonkeyPatch, params, message):
    with api(seeded, monkeypatch) as client:
        response = client.get(PATH, params=params)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_cursor_of_another_page_shape_still_pages_forward(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    cursor = encode_cursor(datetime(2000, 1, 1, tzinfo=timezone.utc), "")
    with api(seeded, monkeypatch) as client:
        assert (
            len(client.get(PATH, params={"connection": "north", "cursor": cursor, "limit": 100}).json()["records"])
            == 30
        )


def test_unknown_syncs_and_connections_are_404(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    with api(seeded, monkeypatch) as client:
        assert client.get("/records/acme/invoices", params={"connection": "north"}).status_code == 404
        assert client.get("/records/nope/contacts", params={"connection": "north"}).status_code == 404
        missing = client.get(PATH, params={"connection": "west"})
    assert missing.status_code == 404 and "west" in missing.json()["error"]


def test_with_the_database_down_it_answers_503_and_recovers(database_url: str, monkeypatch: pytest.MonkeyPatch):
    with ExitStack() as stack:
        store, down, up = _unavailable_store(database_url, stack)
        stack.callback(store.close)
        store.connections.add("acme", "north", account_id="acct-1")
        store.save(SYNC.key, "north", SPEC, [{"id": "c1", "name": "Ada"}])
        client = stack.enter_context(api(store, monkeypatch))
        assert client.get(PATH, params={"connection": "north"}).status_code == 200
        down()
        refused = client.get(PATH, params={"connection": "north"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        up()
        again = client.get(PATH, params={"connection": "north"})
        assert again.status_code == 200, again.text
        assert [r["id"] for r in again.json()["records"]] == ["c1"]


def _unavailable_store(database_url: str, stack: ExitStack) -> tuple[Store, Any, Any]:
    """Postgres: connections go through a proxy the test cuts. SQLite: another connection holds
    the database in exclusive locking mode, which keeps even WAL readers out."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        proxy = stack.enter_context(TcpProxy(url.host or "127.0.0.1", url.port or 5432))
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        return Store(proxied), proxy.cut, proxy.restore
    engine = make_engine(database_url)

    @sa_event.listens_for(engine, "do_connect")
    def _short_busy_timeout(_dialect: Any, _record: Any, _args: Any, params: dict[str, Any]) -> None:
        params["timeout"] = 0.2  # the busy timeout of the connection's first statements

    @sa_event.listens_for(engine, "connect")
    def _short_busy_timeout_after(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=200")

    store = Store(database_url, engine=engine)
    holders: list[sqlite3.Connection] = []
    stack.callback(lambda: [holder.close() for holder in holders])

    def down() -> None:
        engine.dispose()  # readers must open new connections, as after a restart
        holder = sqlite3.connect(url.database or "", isolation_level=None, check_same_thread=False)
        holders.append(holder)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")

    def up() -> None:
        holders.pop().close()

    return store, down, up


# -- scoped tokens -------------------------------------------------------------------------------

OTHER = contacts_sync(provider="globex", updated_field=None)


@contextmanager
def scoped_api(store: Store, monkeypatch: pytest.MonkeyPatch, **env: str) -> Iterator[str]:
    monkeypatch.delenv("SYNC_RECORDS_API_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with BackgroundServer(create_app(store, providers={}, syncs=[SYNC, OTHER])) as server:
        yield server.url


def read(url: str, token: str, connection: str, path: str = PATH) -> httpx.Response:
    return httpx.get(f"{url}{path}", params={"connection": connection}, headers={"authorization": f"Bearer {token}"})


@pytest.fixture
def two_providers(seeded: Store) -> Store:
    seeded.connections.add("globex", "north", account_id="g-1")
    seeded.save(OTHER.key, "north", OTHER.record_spec, [{"id": "g1", "name": "other provider"}])
    return seeded


def test_a_token_scoped_to_a_connection_reads_it_and_gets_403_elsewhere(
    two_providers: Store, monkeypatch: pytest.MonkeyPatch
):
    tokens = "tok_north=acme/north; tok_acme=acme tok_all=*"
    with scoped_api(two_providers, monkeypatch, SYNC_RECORDS_API_TOKENS=tokens) as url:
        assert read(url, "tok_north", "north").status_code == 200
        south, west = read(url, "tok_north", "south"), read(url, "tok_north", "west")
        # An existing and a missing connection outside the scope get the same answer.
        assert (south.status_code, west.status_code) == (403, 403)
        assert south.json()["error"].replace("south", "X") == west.json()["error"].replace("west", "X")
        assert read(url, "tok_north", "north", "/records/globex/contacts").status_code == 403

        assert [read(url, "tok_acme", c).status_code for c in ("north", "south", "west")] == [200, 200, 404]
        assert read(url, "tok_acme", "north", "/records/globex/contacts").status_code == 403
        assert read(url, "tok_all", "north", "/records/globex/contacts").json()["records"][0]["id"] == "g1"
        assert read(url, "tok_nobody", "north").status_code == 401


def test_tokens_from_a_file_are_stored_as_hashes_and_scoped(
    two_providers: Store, monkeypatch: pytest.MonkeyPatch, tmp_path
):
    secret = "tok_from_file_91c2"
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps(
            {
                "tokens": [
                    {
                        "name": "crm-app",
                        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                        "scopes": ["acme/south", "globex"],
                    },
                ]
            }
        )
    )
    assert secret not in path.read_text()
    with scoped_api(two_providers, monkeypatch, SYNC_RECORDS_API_TOKENS_FILE=str(path)) as url:
        assert read(url, secret, "south").json()["records"][0]["id"] == "s1"
        assert read(url, secret, "north", "/records/globex/contacts").status_code == 200
        assert read(url, secret, "north").status_code == 403
        assert read(url, hashlib.sha256(secret.encode()).hexdigest(), "south").status_code == 401


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SYNC_RECORDS_API_TOKENS": "tok_secret_x"}, "entry #0 is not TOKEN=SCOPE"),
        ({"SYNC_RECORDS_API_TOKENS": "tok_secret_x=acme/north/extra"}, "is not *, PROVIDER or PROVIDER/CONNECTION"),
        ({"SYNC_RECORDS_API_TOKENS": "tok_secret_x=acme/"}, "is not *, PROVIDER or PROVIDER/CONNECTION"),
        ({"SYNC_RECORDS_API_TOKENS": "tok_secret_x=,"}, "no scope"),
        ({"SYNC_RECORDS_API_TOKENS_FILE": "/nonexistent/tokens.json"}, "cannot read it"),
    ],
)
def test_unreadable_token_configuration_stops_the_receiver_at_start_up(
    store: Store, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ReceiverConfigError) as raised:
        create_app(store, providers={}, syncs=[SYNC])
    assert message in str(raised.value)
    assert "tok_secret_x" not in str(raised.value)


def test_a_tokens_file_holding_a_token_instead_of_its_hash_is_refused(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path
):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"sha256": "rec_plain_token", "scopes": ["*"]}]}))
    monkeypatch.setenv("SYNC_RECORDS_API_TOKENS_FILE", str(path))
    with pytest.raises(ReceiverConfigError, match="the token's SHA-256, not the token"):
        create_app(store, providers={}, syncs=[SYNC])


def test_a_page_from_before_a_removal_says_so(seeded: Store, monkeypatch: pytest.MonkeyPatch):
    with api(seeded, monkeypatch) as client:
        cursor = client.get(PATH, params={"connection": "north", "limit": 100}).json()["next_cursor"]
        seeded.reset(SYNC.key, "north", records="remove", requested_by="cli:test")
        stale = client.get(PATH, params={"connection": "north", "cursor": cursor}).json()
        assert stale["records"] == [] and stale["reset"]["removed"] == 30
        fresh = client.get(PATH, params={"connection": "north"}).json()
        assert fresh == {"records": [], "next_cursor": None, "has_more": False}
