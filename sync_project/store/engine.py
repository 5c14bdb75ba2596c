"""Engines for the two supported backends, configured for many processes writing at once."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Connection, Engine, make_url

from sync_project import settings
from sync_project.settings import DatabaseTimeouts
from sync_project.store.errors import StoreUnavailableError

#: Bounded: a writer queues this long for SQLite's one write lock, then fails with "database is
#: locked" (StoreUnavailableError: a 503 at the receiver, whose commit deadline answers sooner).
SQLITE_BUSY_TIMEOUT_S = 30.0


def make_engine(url: str, *, timeouts: DatabaseTimeouts | None = None) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql://...``).

    On Postgres every connection gets the statement and lock timeouts and TCP keepalives of
    ``timeouts`` (default: :func:`sync_project.settings.database_timeouts`, from the environment);
    see :class:`~sync_project.settings.DatabaseTimeouts` for the values and why.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; dagster-postgres already brings psycopg2.
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        connect_args = postgres_connect_args(parsed.query, timeouts or settings.database_timeouts())
        # Pages of 5,000 rows per INSERT: fewer round trips than the default 1,000.
        return create_engine(url, pool_pre_ping=True, insertmanyvalues_page_size=5000, connect_args=connect_args)
    raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")


def postgres_connect_args(query: Mapping[str, str | Sequence[str]], timeouts: DatabaseTimeouts) -> dict[str, Any]:
    """libpq parameters for ``timeouts``, leaving alone whatever the URL's ``query`` sets itself.

    Passed as ``connect_args``, they take precedence over the URL's query, so the URL's own
    ``options`` (e.g. ``-csearch_path=...``) is merged in here rather than replaced.
    """
    wanted: dict[str, Any] = {
        "connect_timeout": timeouts.connect_timeout_s,
        "keepalives": 1,
        "keepalives_idle": timeouts.keepalives_idle_s,
        "keepalives_interval": timeouts.keepalives_interval_s,
        "keepalives_count": timeouts.keepalives_count,
        "tcp_user_timeout": _ms(timeouts.tcp_user_timeout_s),
    }
    connect_args = {name: value for name, value in wanted.items() if name not in query}
    if timeouts.session_options:
        given = query.get("options", "")
        given = " ".join(given) if not isinstance(given, str) else given
        # libpq reads PGOPTIONS only when no options are passed: keep an operator's.
        given = " ".join(filter(None, (os.environ.get("PGOPTIONS", "").strip(), given)))
        connect_args["options"] = session_options(timeouts, given)
    return connect_args


def session_options(timeouts: DatabaseTimeouts, given: str = "") -> str:
    """The startup ``options``: our ``-c`` settings, then ``given`` (a URL's), whose own win."""
    values: dict[str, int] = {
        "statement_timeout": _ms(timeouts.statement_timeout_s),
        "lock_timeout": _ms(timeouts.lock_timeout_s),
        # The server's side of the keepalives: it ends a session whose client vanished.
        "tcp_keepalives_idle": timeouts.keepalives_idle_s,
        "tcp_keepalives_interval": timeouts.keepalives_interval_s,
        "tcp_keepalives_count": timeouts.keepalives_count,
        "tcp_user_timeout": _ms(timeouts.tcp_user_timeout_s),
    }
    ours = [f"-c {name}={value}" for name, value in values.items() if not _names(given, name)]
    return " ".join([*ours, given.strip()]).strip()


def _names(options: str, setting: str) -> bool:
    # "-c name=v", "-cname=v" and "--name=v" all set it.
    return re.search(rf"(?:^|[\s-]|-c){re.escape(setting)}=", options) is not None


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event, below, issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the database write lock up front, so a read-then-write merge is atomic and
        # two writers queue on busy_timeout instead of failing with SQLITE_BUSY halfway through.
        # Readers ask for a deferred transaction and never wait for writers (WAL).
        mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


@contextmanager
def unavailable_as_store_error() -> Iterator[None]:
    """Turn "cannot reach / too busy" driver errors into :class:`StoreUnavailableError`."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as error:
        raise StoreUnavailableError(f"records database unavailable: {error.orig}") from error
    except exc.DBAPIError as error:
        if error.connection_invalidated:
            raise StoreUnavailableError(f"records database connection lost: {error.orig}") from error
        raise


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A transaction for reads only. On SQLite it is deferred, so it never queues behind a writer
    (WAL readers see the last commit); a plain ``engine.connect()`` there would ``BEGIN IMMEDIATE``
    and wait for the write lock that a long merge holds."""
    with engine.connect() as conn:
        conn = conn.execution_options(readonly=True)
        with conn.begin():
            yield conn
