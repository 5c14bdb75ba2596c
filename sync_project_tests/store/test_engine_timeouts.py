"""Every wait on the store's database has a deadline: statement and lock timeouts, TCP keepalives.

On the shared Postgres, each test in its own schema (the ``postgres_url`` fixture, whose
``options=-csearch_path=...`` must survive the engine's own options).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from sync_project import settings
from sync_project.settings import DatabaseTimeouts
from sync_project.store import Store
from sync_project.store.engine import make_engine, unavailable_as_store_error
from sync_project.store.errors import StoreUnavailableError
from sync_project_tests.store.helpers import CONN, NEWEST, contact

SERVER_SETTINGS = (
    "statement_timeout",
    "lock_timeout",
    "search_path",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
)
LIBPQ_PARAMETERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)


@pytest.fixture(autouse=True)
def no_timeout_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in (*settings._TIMEOUT_FIELDS, "PGOPTIONS"):
        monkeypatch.delenv(env, raising=False)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    opened: list[Engine] = []
    yield opened
    for engine in opened:
        engine.dispose()


def _schema(url: str) -> str:
    return str(make_url(url).query["options"]).removeprefix("-csearch_path=")


def _session(engine: Engine) -> tuple[dict[str, str], dict[str, str]]:
    """What the server says the session's settings are, and the libpq parameters it was opened with."""
    with engine.connect() as conn:
        shown = {name: conn.execute(text(f"SHOW {name}")).scalar_one() for name in SERVER_SETTINGS}
        dsn = conn.connection.dbapi_connection.get_dsn_parameters()  # type: ignore[union-attr]
    return shown, {name: dsn.get(name) for name in (*LIBPQ_PARAMETERS, "options")}


def test_every_connection_gets_the_timeouts_and_keepalives_and_keeps_the_urls_options(
    postgres_url: str, engines: list[Engine]
) -> None:
    engines.append(engine := make_engine(postgres_url))
    shown, libpq = _session(engine)
    assert shown == {
        "statement_timeout": "5min",
        "lock_timeout": "2min",
        "search_path": _schema(postgres_url),
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
    assert {k: v for k, v in libpq.items() if k != "options"} == {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }


def test_the_environment_sets_them(postgres_url: str, engines: list[Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNC_DB_STATEMENT_TIMEOUT_S", "1.5")
    monkeypatch.setenv("SYNC_DB_LOCK_TIMEOUT_S", "0.25")
    monkeypatch.setenv("SYNC_DB_KEEPALIVES_IDLE_S", "7")
    monkeypatch.setenv("SYNC_DB_TCP_USER_TIMEOUT_S", "12")
    engines.append(engine := make_engine(postgres_url))
    shown, libpq = _session(engine)
    assert (shown["statement_timeout"], shown["lock_timeout"], shown["tcp_keepalives_idle"]) == ("1500ms", "250ms", "7")
    assert (libpq["keepalives_idle"], libpq["tcp_user_timeout"]) == ("7", "12000")
    assert shown["search_path"] == _schema(postgres_url)


def test_a_bad_setting_is_refused_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNC_DB_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="SYNC_DB_LOCK_TIMEOUT_S='soon'"):
        settings.database_timeouts()
    monkeypatch.setenv("SYNC_DB_LOCK_TIMEOUT_S", "-1")
    with pytest.raises(ValueError, match="SYNC_DB_LOCK_TIMEOUT_S"):
        make_engine("postgresql://postgres@127.0.0.1/test")


def test_a_setting_the_urls_own_options_name_wins(postgres_url: str, engines: list[Engine]) -> None:
    options = f"-csearch_path={_schema(postgres_url)} -c statement_timeout=7s"
    url = make_url(postgres_url).update_query_dict({"options": options}).render_as_string(hide_password=False)
    engines.append(engine := make_engine(url))
    shown, _ = _session(engine)
    assert (shown["statement_timeout"], shown["lock_timeout"]) == ("7s", "2min")
    assert shown["search_path"] == _schema(postgres_url)


def test_with_session_options_off_nothing_is_sent_at_startup_but_the_urls_own(
    postgres_url: str, engines: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pooler in transaction mode needs: pgbouncer refuses an unknown startup parameter."""
    monkeypatch.setenv("SYNC_DB_SESSION_OPTIONS", "off")
    engines.append(engine := make_engine(postgres_url))
    engines.append(plain := create_engine(postgres_url))  # what the server gives without us
    shown, libpq = _session(engine)
    with plain.connect() as conn:
        server_default = conn.execute(text("SHOW statement_timeout")).scalar_one()
    assert server_default != "5min"
    assert libpq["options"] == f"-csearch_path={_schema(postgres_url)}"
    assert (shown["statement_timeout"], shown["search_path"]) == (server_default, _schema(postgres_url))
    assert libpq["keepalives"] == "1"  # client side: not a startup parameter, so it stays


def test_a_write_behind_a_held_lock_fails_with_the_lock_timeout_instead_of_waiting(
    postgres_url: str, engines: list[Engine]
) -> None:
    with Store(postgres_url) as store:
        store.save("acme/contacts", CONN, NEWEST, [contact("c-1", 1)])
    engines.append(bounded := make_engine(postgres_url, timeouts=DatabaseTimeouts(lock_timeout_s=1)))
    engines.append(holder_engine := make_engine(postgres_url))
    with Store(postgres_url, engine=bounded) as store, holder_engine.connect() as holder:
        holder.begin()
        holder.execute(text("LOCK TABLE records IN SHARE MODE"))  # as a session that never commits
        release = _terminate_later(holder_engine, holder.execute(text("SELECT pg_backend_pid()")).scalar_one())
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="lock timeout"):
                store.save("acme/contacts", CONN, NEWEST, [contact("c-1", 2)])
            waited = time.monotonic() - started
        finally:
            release.cancel()
        assert waited < 10  # 1 s lock timeout; without it, this waits for the 20 s safety net
        holder.rollback()
        store.save("acme/contacts", CONN, NEWEST, [contact("c-1", 2)])  # the same engine, once it is free
        assert store.get("acme/contacts", CONN, "c-1").data["version"] == 2  # type: ignore[union-attr]


def test_a_statement_past_the_statement_timeout_is_cancelled(postgres_url: str, engines: list[Engine]) -> None:
    engines.append(engine := make_engine(postgres_url, timeouts=DatabaseTimeouts(statement_timeout_s=0.5)))
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="statement timeout"):
        with unavailable_as_store_error(), engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(20)"))
    assert time.monotonic() - started < 10
    with engine.connect() as conn:  # the pool's next connection is fine
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_sqlite_waits_for_the_write_lock_a_bounded_time(sqlite_url: str, engines: list[Engine]) -> None:
    engines.append(engine := make_engine(sqlite_url))
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30_000


def _terminate_later(engine: Engine, pid: int, after_s: float = 20.0) -> threading.Timer:
    """A safety net: end the lock holder's session if the test would otherwise hang."""

    def terminate() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            conn.commit()

    timer = threading.Timer(after_s, terminate)
    timer.daemon = True
    timer.start()
    return timer
