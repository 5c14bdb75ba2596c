"""Engines for the two supported backends, configured for many processes writing at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Connection, Engine, make_url

from sync_project.store.errors import StoreUnavailableError

SQLITE_BUSY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql://...``)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            # SQLAlchemy 2.1 defaults to psycopg 3; dagster-postgres already brings psycopg2.
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        # Pages of 5,000 rows per INSERT: fewer round trips than the default 1,000. A bounded
        # connect timeout turns an unreachable server into StoreUnavailableError (HTTP 503 at the
        # receiver) within seconds instead of after the kernel's TCP timeout.
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_S}
        return create_engine(url, pool_pre_ping=True, insertmanyvalues_page_size=5000, connect_args=connect_args)
    raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
    )

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
